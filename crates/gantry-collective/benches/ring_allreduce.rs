//! All-reduce bus bandwidth of the ring backend on loopback, ranks as threads.
//!
//! `cargo bench -p gantry-collective --bench ring_allreduce -- [--ranks 2,4]
//! [--sizes-mb 1,4,8,16,64,256] [--iters 10] [--warmup 2] [--chunk-kb 256]
//! [--sockbuf-kb 512 (0 = kernel autotuning)] [--shared-memory] [--hosts H]
//! [--elems 1460000,...]`
//!
//! `--hosts H` has the ranks claim `H` hosts (`RingConfig::host`), split evenly in blocks of
//! consecutive ranks, so that with `--shared-memory` the hierarchical all-reduce runs (a
//! region per claimed host, a TCP ring of the hosts' leaders); without `--shared-memory` the
//! claims change nothing and the flat TCP ring runs. `--elems` gives sizes in floats (a
//! model's gradient count); they replace the default MiB sizes unless `--sizes-mb` is given
//! too.
//!
//! Prints one tab-separated line per (ranks, size):
//! `<path> <ranks> <MiB> <busbw GB/s> <median ms>`, the path being the one rank 0's ring
//! reports: `ring` (TCP), `shm` (one shared region, `--shared-memory`) or `hier`
//! (hierarchical, `--shared-memory --hosts 2` or more); MiB is a whole number for
//! `--sizes-mb` sizes and has two decimals otherwise; busbw = bytes * 2(n-1)/n / time (the NCCL-tests convention) and time is,
//! per iteration, the slowest rank's all-reduce after a barrier; median over
//! iterations. `scripts/bench-allreduce.sh` runs it next to gloo.

use std::net::TcpListener;
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use gantry_collective::{AllReducePath, Collective, ReduceOp, RingCollective, RingConfig};

struct Args {
    ranks: Vec<usize>,
    sizes_mb: Vec<usize>,
    iters: usize,
    warmup: usize,
    chunk_kb: usize,
    sockbuf_kb: usize,
    shared_memory: bool,
    /// Claimed hosts; 0 leaves the claim to the machine (one host).
    hosts: usize,
    /// Extra sizes, in floats.
    elems: Vec<usize>,
}

fn list(v: &str) -> Vec<usize> {
    v.split(',')
        .map(|x| x.trim().parse().expect("number"))
        .collect()
}

fn parse_args() -> Args {
    let mut a = Args {
        ranks: vec![2, 4],
        sizes_mb: vec![1, 4, 8, 16, 64, 256],
        iters: 10,
        warmup: 2,
        chunk_kb: 256,
        sockbuf_kb: 512,
        shared_memory: false,
        hosts: 0,
        elems: Vec::new(),
    };
    let mut sizes_mb_given = false;
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        // `cargo bench` appends `--bench`; ignore flags we do not know.
        let mut val = || it.next().expect("flag needs a value");
        match flag.as_str() {
            "--ranks" => a.ranks = list(&val()),
            "--sizes-mb" => {
                a.sizes_mb = list(&val());
                sizes_mb_given = true;
            }
            "--iters" => a.iters = val().parse().expect("iters"),
            "--warmup" => a.warmup = val().parse().expect("warmup"),
            "--chunk-kb" => a.chunk_kb = val().parse().expect("chunk-kb"),
            "--sockbuf-kb" => a.sockbuf_kb = val().parse().expect("sockbuf-kb"),
            "--shared-memory" => a.shared_memory = true,
            "--hosts" => a.hosts = val().parse().expect("hosts"),
            "--elems" => a.elems = list(&val()),
            _ => {}
        }
    }
    if !a.elems.is_empty() && !sizes_mb_given {
        a.sizes_mb.clear();
    }
    a
}

fn main() {
    let args = parse_args();
    // Sizes in floats: the MiB sizes, then the --elems ones.
    let sizes: Vec<usize> = args
        .sizes_mb
        .iter()
        .map(|mb| (mb << 20) / 4)
        .chain(args.elems.iter().copied())
        .collect();
    let max_len = sizes.iter().max().copied().unwrap_or(0);
    for &n in &args.ranks {
        assert!(
            args.hosts <= n,
            "--hosts {} is more than --ranks {n}",
            args.hosts
        );
        let listeners: Vec<_> = (0..n)
            .map(|_| TcpListener::bind("127.0.0.1:0").unwrap())
            .collect();
        let addrs: Vec<_> = listeners.iter().map(|l| l.local_addr().unwrap()).collect();
        let (tx, rx) = mpsc::channel();
        let handles: Vec<_> = listeners
            .into_iter()
            .enumerate()
            .map(|(rank, listener)| {
                let mut config = RingConfig::new(rank, n, addrs.clone());
                config.timeout = Duration::from_secs(120);
                config.chunk_bytes = args.chunk_kb << 10;
                config.socket_buffer_bytes = (args.sockbuf_kb > 0).then_some(args.sockbuf_kb << 10);
                config.shared_memory = args.shared_memory;
                if args.hosts > 0 {
                    config.host = Some(format!("bench-host-{}", rank * args.hosts / n));
                }
                let sizes = sizes.clone();
                let (iters, warmup) = (args.iters, args.warmup);
                let tx = tx.clone();
                thread::spawn(move || {
                    let mut ring = RingCollective::from_listener(listener, config).unwrap();
                    let path = ring.all_reduce_path();
                    let mut buf = vec![1.0f32; max_len];
                    for len in sizes {
                        let data = &mut buf[..len];
                        let mut times = Vec::with_capacity(iters);
                        for i in 0..warmup + iters {
                            ring.barrier().unwrap();
                            let t = Instant::now();
                            ring.all_reduce_f32(data, ReduceOp::Sum).unwrap();
                            if i >= warmup {
                                times.push(t.elapsed());
                            }
                        }
                        tx.send((len, rank, path, times)).unwrap();
                    }
                })
            })
            .collect();
        drop(tx);
        let mut per_size: Vec<(usize, Vec<Duration>)> = Vec::new();
        let mut label = "ring";
        for (len, rank, path, times) in rx {
            if rank == 0 {
                label = match path {
                    AllReducePath::Tcp => "ring",
                    AllReducePath::SharedMemory => "shm",
                    AllReducePath::Hierarchical { .. } => "hier",
                };
            }
            match per_size.iter_mut().find(|(m, _)| *m == len) {
                // Slowest rank per iteration.
                Some((_, t)) => t
                    .iter_mut()
                    .zip(&times)
                    .for_each(|(a, b)| *a = (*a).max(*b)),
                None => per_size.push((len, times)),
            }
        }
        for h in handles {
            h.join().unwrap();
        }
        for (len, mut times) in per_size {
            times.sort();
            let median = times[times.len() / 2].as_secs_f64();
            let bytes = (len * 4) as f64;
            let busbw = bytes * 2.0 * (n - 1) as f64 / n as f64 / median / 1e9;
            let mib = if (len * 4).is_multiple_of(1 << 20) {
                format!("{}", (len * 4) >> 20)
            } else {
                format!("{:.2}", bytes / (1 << 20) as f64)
            };
            println!("{label}\t{n}\t{mib}\t{busbw:.3}\t{:.2}", median * 1e3);
        }
    }
}
