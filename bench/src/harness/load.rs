//! What a run sends: conversations of one or more turns, from a Mooncake
//! trace (one turn each, at the trace's scaled arrival times) or
//! synthesised (Poisson or fixed-rate arrivals, or a fixed number of
//! concurrent clients; length ranges; shared system prompts; multi-turn
//! conversations where each turn's prompt extends the last).

use crate::workload::Synth;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tandem_kvstore::trace::TraceRequest;

/// One request: a token prompt and how many tokens to generate (the
/// client sets `ignore_eos`, so exactly this many come back).
#[derive(Debug, Clone, PartialEq)]
pub struct Turn {
    pub prompt: Vec<u32>,
    pub max_tokens: u32,
}

/// Turns sent one after another by one client: the next is sent
/// `think_ms` after the previous finished.
#[derive(Debug, Clone, PartialEq)]
pub struct Conversation {
    /// When its first turn is sent, ms after the start (ignored with a
    /// fixed concurrency: a free client takes the next conversation).
    pub start_ms: u64,
    pub turns: Vec<Turn>,
    /// Pause between a turn's answer and the next turn.
    pub think_ms: u64,
}

/// How requests arrive.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Arrival {
    /// Exponential gaps at `rate` conversations per second.
    Poisson { rate: f64 },
    /// Evenly spaced at `rate` per second.
    Fixed { rate: f64 },
    /// `n` clients, each sending its next conversation when the last ended.
    Concurrency(u32),
}

impl Arrival {
    /// The offered load for reports.
    pub fn rate(&self) -> Option<f64> {
        match *self {
            Arrival::Poisson { rate } | Arrival::Fixed { rate } => Some(rate),
            Arrival::Concurrency(_) => None,
        }
    }

    pub fn concurrency(&self) -> Option<u32> {
        match *self {
            Arrival::Concurrency(n) => Some(n),
            _ => None,
        }
    }
}

/// An inclusive range of token counts, drawn uniformly.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Lengths {
    pub min: u32,
    pub max: u32,
}

impl Lengths {
    /// "256" or "128-512".
    pub fn parse(s: &str) -> Result<Lengths, String> {
        let num = |t: &str| t.trim().parse::<u32>().map_err(|_| format!("{t:?} is not a token count"));
        let (min, max) = match s.split_once('-') {
            Some((a, b)) => (num(a)?, num(b)?),
            None => (num(s)?, num(s)?),
        };
        if min == 0 || max < min {
            return Err(format!("length range {s:?} must be positive and ascending"));
        }
        Ok(Lengths { min, max })
    }

    fn draw(&self, rng: &mut StdRng) -> u32 {
        rng.random_range(self.min..=self.max)
    }
}

/// A synthetic workload.
#[derive(Debug, Clone, PartialEq)]
pub struct SyntheticSpec {
    /// Requests in all (turns of all conversations).
    pub requests: u32,
    /// New user tokens per turn (after the system prompt, or after the
    /// previous turn and its answer).
    pub input: Lengths,
    pub output: Lengths,
    /// Distinct system prompts the conversations share (0: none).
    pub prefix_groups: u32,
    pub prefix_tokens: u32,
    /// Turns per conversation (1: independent requests).
    pub turns: u32,
    pub think_ms: u64,
    pub seed: u64,
    /// Token ids are drawn from `[vocab_lo, vocab_hi)`.
    pub vocab_lo: u32,
    pub vocab_hi: u32,
}

impl SyntheticSpec {
    pub fn validate(&self) -> Result<(), String> {
        if self.requests == 0 {
            return Err("a workload needs at least one request".into());
        }
        if self.turns == 0 {
            return Err("turns must be at least 1".into());
        }
        if self.prefix_groups > 0 && self.prefix_tokens == 0 {
            return Err("prefix groups need prefix tokens".into());
        }
        if self.vocab_hi <= self.vocab_lo {
            return Err(format!("empty token range [{}, {})", self.vocab_lo, self.vocab_hi));
        }
        Ok(())
    }

    /// One line for reports.
    pub fn describe(&self, arrival: &Arrival) -> String {
        let arrival = match *arrival {
            Arrival::Poisson { rate } => format!("Poisson arrivals at {rate} conversations/s"),
            Arrival::Fixed { rate } => format!("fixed-rate arrivals at {rate} conversations/s"),
            Arrival::Concurrency(n) => format!("{n} concurrent clients"),
        };
        let range = |l: &Lengths| if l.min == l.max { l.min.to_string() } else { format!("{}-{}", l.min, l.max) };
        let mut s = format!(
            "synthetic: {} requests, {arrival}, {} new prompt tokens and {} output tokens per turn",
            self.requests,
            range(&self.input),
            range(&self.output)
        );
        if self.prefix_groups > 0 {
            s += &format!(", {} shared system prompts of {} tokens", self.prefix_groups, self.prefix_tokens);
        }
        if self.turns > 1 {
            s += &format!(", {} turns per conversation ({} ms think time)", self.turns, self.think_ms);
        }
        s + &format!(", seed {}", self.seed)
    }

    /// The conversations, deterministic for a seed. Turn k+1's prompt is
    /// turn k's prompt, a synthetic answer of turn k's output length, then
    /// new user tokens: it extends the last, so the store holds its prefix.
    pub fn generate(&self, arrival: &Arrival) -> Result<Vec<Conversation>, String> {
        self.validate()?;
        let mut rng = StdRng::seed_from_u64(self.seed);
        let blocks = Synth {
            trace_block_tokens: self.prefix_tokens.max(1),
            block_tokens: self.prefix_tokens.max(1),
            output_scale: 1.0,
            time_scale: 1.0,
            vocab_lo: self.vocab_lo,
            vocab_hi: self.vocab_hi,
        };
        let tokens = |rng: &mut StdRng, n: u32| -> Vec<u32> {
            (0..n).map(|_| rng.random_range(self.vocab_lo..self.vocab_hi)).collect()
        };
        let conversations = self.requests.div_ceil(self.turns);
        let mut out = Vec::with_capacity(conversations as usize);
        let mut at = 0.0f64;
        let mut left = self.requests;
        for c in 0..conversations {
            let start_ms = at.round() as u64;
            match *arrival {
                Arrival::Poisson { rate } => {
                    let u: f64 = rng.random_range(f64::EPSILON..1.0);
                    at += -u.ln() / rate * 1000.0;
                }
                Arrival::Fixed { rate } => at += 1000.0 / rate,
                Arrival::Concurrency(_) => {}
            }
            let mut context = if self.prefix_groups > 0 {
                // A fixed id space per group: the same system prompt tokens
                // in every conversation of the group.
                blocks.block(u64::from(c % self.prefix_groups) + 0x5157_0000)
            } else {
                Vec::new()
            };
            let n = self.turns.min(left);
            left -= n;
            let mut turns = Vec::with_capacity(n as usize);
            for _ in 0..n {
                let user = self.input.draw(&mut rng);
                context.extend(tokens(&mut rng, user));
                let max_tokens = self.output.draw(&mut rng);
                turns.push(Turn { prompt: context.clone(), max_tokens });
                let answer = tokens(&mut rng, max_tokens);
                context.extend(answer);
            }
            out.push(Conversation { start_ms, turns, think_ms: self.think_ms });
        }
        Ok(out)
    }
}

/// A trace as conversations of one turn each, at its scaled times.
pub fn from_trace(trace: &[TraceRequest], synth: &Synth) -> Vec<Conversation> {
    trace
        .iter()
        .map(|r| {
            let p = synth.plan(r);
            Conversation {
                start_ms: p.at_ms,
                turns: vec![Turn { prompt: p.prompt, max_tokens: p.max_tokens }],
                think_ms: 0,
            }
        })
        .collect()
}

/// Cuts every prompt so that it and its output fit `max_tokens` tokens
/// (at least one prompt token is kept); returns how many were cut.
pub fn cap_prompts(conversations: &mut [Conversation], max_tokens: u32) -> usize {
    let mut cut = 0;
    for t in conversations.iter_mut().flat_map(|c| c.turns.iter_mut()) {
        let keep = (max_tokens.saturating_sub(t.max_tokens) as usize).max(1);
        if t.prompt.len() > keep {
            t.prompt.truncate(keep);
            cut += 1;
        }
    }
    cut
}

/// Mean prompt and output lengths over all turns.
pub fn mean_lengths(conversations: &[Conversation]) -> (f64, f64) {
    let turns: Vec<&Turn> = conversations.iter().flat_map(|c| &c.turns).collect();
    if turns.is_empty() {
        return (0.0, 0.0);
    }
    let n = turns.len() as f64;
    let input = turns.iter().map(|t| t.prompt.len() as f64).sum::<f64>() / n;
    let output = turns.iter().map(|t| f64::from(t.max_tokens)).sum::<f64>() / n;
    (input, output)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> SyntheticSpec {
        SyntheticSpec {
            requests: 10,
            input: Lengths { min: 20, max: 40 },
            output: Lengths { min: 5, max: 5 },
            prefix_groups: 2,
            prefix_tokens: 64,
            turns: 3,
            think_ms: 100,
            seed: 7,
            vocab_lo: 100,
            vocab_hi: 1000,
        }
    }

    #[test]
    fn turns_extend_the_last_and_groups_share_their_system_prompt() {
        let s = spec();
        let conv = s.generate(&Arrival::Fixed { rate: 4.0 }).unwrap();
        assert_eq!(conv.len(), 4, "10 requests in conversations of 3");
        assert_eq!(conv.iter().map(|c| c.turns.len()).sum::<usize>(), 10);
        assert_eq!(conv[3].turns.len(), 1, "the last conversation holds what is left");
        let starts: Vec<u64> = conv.iter().map(|c| c.start_ms).collect();
        assert_eq!(starts, [0, 250, 500, 750]);
        for c in &conv {
            for w in c.turns.windows(2) {
                let (a, b) = (&w[0], &w[1]);
                assert!(b.prompt.starts_with(&a.prompt), "a turn extends the previous one");
                let added = b.prompt.len() - a.prompt.len();
                assert!((5 + 20..=5 + 40).contains(&added), "the answer and new user tokens: {added}");
            }
            assert!(c.turns.iter().all(|t| t.prompt.iter().all(|&x| (100..1000).contains(&x))));
        }
        // Conversations 0 and 2 share group 0's system prompt; 1 has group 1's.
        assert_eq!(conv[0].turns[0].prompt[..64], conv[2].turns[0].prompt[..64]);
        assert_ne!(conv[0].turns[0].prompt[..64], conv[1].turns[0].prompt[..64]);
        assert_ne!(conv[0].turns[0].prompt[64..], conv[2].turns[0].prompt[64..], "user tokens differ");
        assert_eq!(s.generate(&Arrival::Fixed { rate: 4.0 }).unwrap(), conv, "deterministic for a seed");
    }

    #[test]
    fn poisson_gaps_average_the_rate_and_bad_specs_are_named() {
        let mut s = spec();
        s.requests = 4000;
        s.turns = 1;
        let conv = s.generate(&Arrival::Poisson { rate: 10.0 }).unwrap();
        let span = conv.last().unwrap().start_ms as f64 / 1000.0;
        let rate = (conv.len() - 1) as f64 / span;
        assert!((9.0..11.0).contains(&rate), "measured {rate} conversations/s");
        assert!(conv.windows(2).all(|w| w[0].start_ms <= w[1].start_ms));
        let mut bad = spec();
        bad.turns = 0;
        assert!(bad.generate(&Arrival::Concurrency(2)).unwrap_err().contains("turns"));
        assert!(Lengths::parse("10-5").unwrap_err().contains("ascending"));
        assert!(Lengths::parse("x").unwrap_err().contains("token count"));
        assert_eq!(Lengths::parse("128-512").unwrap(), Lengths { min: 128, max: 512 });
    }

    #[test]
    fn long_prompts_are_cut_to_fit_with_their_output() {
        let turn = |n: usize, out: u32| Turn { prompt: (0..n as u32).collect(), max_tokens: out };
        let mut conv =
            vec![Conversation { start_ms: 0, turns: vec![turn(100, 10), turn(80, 30), turn(50, 200)], think_ms: 0 }];
        assert_eq!(cap_prompts(&mut conv, 100), 3);
        let lens: Vec<usize> = conv[0].turns.iter().map(|t| t.prompt.len()).collect();
        assert_eq!(lens, [90, 70, 1], "prompt + output <= 100, at least one prompt token");
        assert_eq!(conv[0].turns[0].prompt[..], (0..90).collect::<Vec<u32>>()[..], "the leading tokens are kept");
        assert_eq!(cap_prompts(&mut conv, 100), 0, "nothing left to cut");
    }
}
