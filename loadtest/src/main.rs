//! `portcullis-loadtest`: parse the command line, run, exit 2 on bad usage.
//! See `loadtest/README.md`.

use clap::Parser;

fn main() {
    let cli = portcullis_loadtest::cli::Cli::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("portcullis-loadtest: error: cannot start the runtime: {e}");
            std::process::exit(1);
        }
    };
    if let Err(e) = rt.block_on(portcullis_loadtest::run::run(cli)) {
        eprintln!("portcullis-loadtest: error: {e}");
        std::process::exit(2);
    }
    // Do not wait for tasks still closing sockets: the run is over.
    rt.shutdown_timeout(std::time::Duration::from_millis(200));
}
