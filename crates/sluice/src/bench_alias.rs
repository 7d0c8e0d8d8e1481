//! `sluice bench ...`: an alias that hands over to the `sluice-bench` binary
//! beside this one; no benchmark code is in the product binary.

use std::os::unix::process::CommandExt;
use std::process::ExitCode;

/// `sluice bench <args...>`: everything after `bench`, passed through.
#[derive(Debug, clap::Args)]
#[command(disable_help_flag = true)]
pub(crate) struct BenchArgs {
    /// `sluice-bench`'s arguments, e.g. `append --events 1000` (see `sluice bench --help`).
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    args: Vec<std::ffi::OsString>,
}

/// Replaces this process with the `sluice-bench` next to the current
/// executable; returns only if that cannot be done.
pub(crate) fn exec(args: BenchArgs) -> anyhow::Result<ExitCode> {
    let exe = std::env::current_exe()?;
    let bench = exe.with_file_name("sluice-bench");
    if !bench.is_file() {
        anyhow::bail!(
            "{} is missing: the benchmarks are a binary of their own; build it with \
             `cargo build --release -p sluice-bench` (next to this sluice)",
            bench.display()
        );
    }
    let err = std::process::Command::new(&bench).args(args.args).exec();
    Err(anyhow::Error::new(err).context(format!("running {}", bench.display())))
}
