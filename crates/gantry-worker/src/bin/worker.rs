//! `worker`: trains a GAN on one device.

use anyhow::{Result, bail};
use clap::Parser;
use gantry_config::ConfigArgs;
use gantry_models::runtime;

/// A Gantry worker.
#[derive(Debug, Parser)]
#[command(name = "worker", version, about)]
struct Cli {
    /// Train on this process alone (world size 1), without a coordinator.
    #[arg(long)]
    standalone: bool,
    /// Print the devices libtorch sees and exit.
    #[arg(long)]
    list_devices: bool,
    #[command(flatten)]
    config: ConfigArgs,
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    if cli.list_devices {
        println!("{}", runtime::describe_devices());
        return Ok(());
    }
    let settings = cli.config.load()?;
    if !cli.standalone {
        bail!("no mode given: pass --standalone to train on this process alone");
    }
    gantry_worker::train::run_standalone(&settings)?;
    Ok(())
}
