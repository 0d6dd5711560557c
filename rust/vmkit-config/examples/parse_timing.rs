//! Times parse + validate of a realistic command line in Rust alone
//! (`cargo run --release --example parse_timing`).

use std::time::Instant;

use vmkit_config::{VmConfig, VmParams};

fn main() {
    let params = VmParams {
        kernel: Some("/images/vmlinux".into()),
        cmdline: Some("console=ttyS0 root=/dev/vda1 rw".into()),
        cpus: "boot=2".into(),
        memory: "size=1G".into(),
        disks: Some(vec![
            "path=/images/root.img".into(),
            "path=/images/data1.img,readonly=on".into(),
            "path=/images/data2.img,num_queues=2,queue_size=256".into(),
            "path=/images/data3.img,id=scratch".into(),
        ]),
        net: Some(vec![
            "tap=tap0,mac=12:34:56:78:9a:bc".into(),
            "tap=tap1,ip=192.168.10.1,mask=255.255.255.0".into(),
        ]),
        serial: "tty".into(),
        console: "off".into(),
        platform: Some("num_pci_segments=2".into()),
        numa: Some(vec!["guest_numa_id=0,cpus=[0,1]".into()]),
        ..VmParams::default()
    };
    let rounds = 100_000;
    let start = Instant::now();
    for _ in 0..rounds {
        let config = VmConfig::parse(std::hint::black_box(&params)).unwrap();
        std::hint::black_box(config.validated().unwrap());
    }
    let per = start.elapsed().as_secs_f64() / rounds as f64 * 1e6;
    println!("parse + validate: {per:.2} µs per command line");
    let start = Instant::now();
    for _ in 0..rounds {
        std::hint::black_box(vmkit_config::values::MacAddr::random());
    }
    let per = start.elapsed().as_secs_f64() / rounds as f64 * 1e6;
    println!("random MAC: {per:.2} µs");
}
