//! Helpers shared by the multi-process tests: `tandem` child processes
//! that are SIGKILLed when dropped, started until a ready line.
#![allow(dead_code)]

pub mod http;
pub mod procs;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// A child process that is killed (SIGKILL) when dropped.
pub struct Proc {
    pub child: Child,
}

impl Proc {
    pub fn kill9(&mut self) {
        let _ = self.child.kill(); // SIGKILL
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill9();
    }
}

pub fn tandem() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_tandem"));
    c.env("TANDEM_LOG", "info").stdout(Stdio::null()).stderr(Stdio::piped());
    c
}

/// Starts `cmd` and waits for a stderr line containing `ready`; returns the
/// process and that line. The rest of stderr is drained in the background.
pub fn spawn_until(mut cmd: Command, name: &str, ready: &str) -> (Proc, String) {
    let mut child = cmd.spawn().expect("spawn tandem");
    let stderr = child.stderr.take().expect("stderr piped");
    let (tx, rx) = mpsc::channel();
    let ready = ready.to_owned();
    let tag = name.to_owned();
    std::thread::spawn(move || {
        let mut sent = false;
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if !sent && line.contains(&ready) {
                let _ = tx.send(line.clone());
                sent = true;
            }
            if std::env::var_os("TANDEM_TEST_VERBOSE").is_some() {
                eprintln!("[{tag}] {line}");
            }
        }
    });
    let line = rx.recv_timeout(Duration::from_secs(120)).unwrap_or_else(|_| panic!("{name} did not start"));
    (Proc { child }, line)
}
