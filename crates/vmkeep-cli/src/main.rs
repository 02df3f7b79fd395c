//! The `vmkeep` command: a thin layer over the `vmkeep` library.

mod cli;
mod commands;
mod config;
mod output;

use clap::Parser;

use cli::Cli;

fn main() {
    let cli = Cli::parse();
    vmkeep::interrupt::install();
    output::init_logging(cli.quiet, cli.verbose);
    let code = match commands::run(cli) {
        Ok(code) => code,
        Err(e) => {
            output::error_line(&e);
            output::exit_code(&e)
        }
    };
    vmkeep::fault::report();
    std::process::exit(code);
}
