//! `wagg module validate` and resolving a strategy to its bytes.

use anyhow::{Context, bail};

use wagg::runtime::{self, Runtime};

/// A strategy's bytes: a built-in's name, or a file.
pub(crate) fn module_bytes(strategy: &str) -> anyhow::Result<Vec<u8>> {
    if let Some(bytes) = runtime::builtin(strategy) {
        return Ok(bytes.to_vec());
    }
    std::fs::read(strategy).with_context(|| {
        format!(
            "`{strategy}` is neither a built-in strategy ({}) nor a readable file",
            runtime::builtin_names().join(", ")
        )
    })
}

pub(crate) fn validate(file: &str) -> anyhow::Result<()> {
    let bytes = module_bytes(file)?;
    let runtime = Runtime::new(Default::default(), None)?;
    match runtime.load(&bytes) {
        Ok(module) => {
            let info = module.info();
            println!("ok: {file}");
            println!("  world:   {}@{}", info.world, info.version);
            println!("  exports: {}", info.exports.join(", "));
            println!("  id:      {}", info.id);
            println!(
                "  size:    {} bytes, compiled in {:.1?}",
                info.size_bytes, info.compile_time
            );
            Ok(())
        }
        Err(err) => bail!("{file} is refused: {err}"),
    }
}
