//! Boots a kernel and prints its serial output and why it stopped:
//! `cargo run --example boot -- <kernel> [cmdline] [cpus] [memory]`.

use std::time::Duration;

use vmkit_config::{VmConfig, VmParams};
use vmkit_vmm::{Vm, VmOptions};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let params = VmParams {
        kernel: args.first().cloned(),
        cmdline: args.get(1).cloned(),
        cpus: format!("boot={}", args.get(2).map_or("1", String::as_str)),
        memory: format!("size={}", args.get(3).map_or("256M", String::as_str)),
        ..VmParams::default()
    };
    let config = VmConfig::parse(&params)?.validated()?;
    let options = VmOptions {
        watchdog_timeout: Some(Duration::from_secs(5)),
        ..VmOptions::default()
    };
    let vm = Vm::new(config, options)?;
    let start = std::time::Instant::now();
    vm.boot()?;
    let reason = vm.wait(Some(Duration::from_secs(60)));
    let elapsed = start.elapsed();
    if let Some(serial) = vm.serial() {
        let (_, out) = serial.capture.read_from(0);
        print!("{}", String::from_utf8_lossy(&out));
    }
    println!("--- stopped after {elapsed:?}: {reason:?}");
    for w in vm.debug_port_writes() {
        println!("debug port {:#04x} at {:?}", w.value, w.since_creation);
    }
    vm.close();
    Ok(())
}
