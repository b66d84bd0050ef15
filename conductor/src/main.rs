use clap::Parser;

fn main() -> std::process::ExitCode {
    let cli = tandem_conductor::cli::Cli::parse();
    match tandem_conductor::cli::run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
