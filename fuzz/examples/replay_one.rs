//! Runs one input through one target: `cargo run --example replay_one TARGET FILE`.

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let [_, target, file] = args.as_slice() else {
        eprintln!("usage: replay_one TARGET FILE");
        std::process::exit(2);
    };
    let target = vmkit_fuzz::target(target).expect("a known target");
    let data = std::fs::read(file).expect("a readable input");
    let started = std::time::Instant::now();
    (target.run)(&data);
    eprintln!("ok in {:?}", started.elapsed());
}
