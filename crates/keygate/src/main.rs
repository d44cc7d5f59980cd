//! The keygate binary: CLI parsing and wiring. Behaviour lives in the
//! library crates; this stays thin.
#![forbid(unsafe_code)]

mod admin_cmd;
mod busy_poll;
mod cli;
mod client;
mod paths;
mod run;
mod serve;

use clap::Parser;

#[global_allocator]
static GLOBAL: keygate_alloc::KeygateAlloc = keygate_alloc::KeygateAlloc;

fn main() -> std::process::ExitCode {
    let cli = cli::Cli::parse();
    let result = match cli.command {
        cli::Command::Serve(args) => serve::main(cli.data_dir, args),
        cli::Command::Run(args) => run::main(cli.data_dir, &cli.admin_url, args),
        cli::Command::Admin(cmd) => admin_cmd::main(cli.data_dir, &cli.admin_url, cmd),
        cmd => client::main(cli.data_dir, &cli.admin_url, cmd),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("keygate: error: {e:#}");
            std::process::ExitCode::from(2)
        }
    }
}
