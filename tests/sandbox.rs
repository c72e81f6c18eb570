//! The Python sandbox: model-written programs run in a worker process (`experient sandbox`)
//! under time, memory and output limits, with no filesystem, network or environment; every
//! misbehaviour comes back as a clean Python-style error.

use std::time::Duration;

use experient::sandbox::{run_python, Limits};

fn limits() -> Limits {
    Limits {
        time: Duration::from_secs(1),
        memory_bytes: 64 << 20,
        output_bytes: 4096,
    }
}

async fn run(code: &str) -> experient::sandbox::Outcome {
    run_python(code, &limits())
        .await
        .expect("the worker starts")
}

#[tokio::test]
async fn programs_run_and_misbehaviour_is_a_clean_error() {
    // The worker is this crate's binary; the test harness is not.
    std::env::set_var("EXPERIENT_SANDBOX_EXE", env!("CARGO_BIN_EXE_experient"));

    let ok = run("xs = [n * n for n in range(5)]\nprint('sum', sum(xs))\nmax(xs)").await;
    assert_eq!(ok.output, "sum 30\n");
    assert_eq!(ok.value.as_deref(), Some("16"));
    assert_eq!(ok.error, None);

    let t = std::time::Instant::now();
    let spin = run("while True:\n    pass").await;
    assert!(spin.error.unwrap().contains("TimeoutError"));
    assert!(t.elapsed() < Duration::from_secs(5));

    let big = run("x = [0] * (10 ** 9)\nlen(x)").await;
    assert!(
        big.error.as_deref().unwrap().contains("MemoryError"),
        "{big:?}"
    );

    let chatty = run("while True:\n    print('spam' * 100)").await;
    assert!(chatty.error.is_some(), "{chatty:?}");
    assert!(chatty.output.len() <= 4096);

    for code in [
        "import os\nos.listdir('/')",
        "import os\nos.getenv('HOME')",
        "import socket",
        "open('/etc/passwd').read()",
    ] {
        let out = run(code).await;
        assert!(out.error.is_some(), "{code}: {out:?}");
        assert!(!out.describe().contains("root:"), "{code}");
    }

    let deep = run("def f(n):\n    return f(n + 1)\nf(0)").await;
    assert!(deep.error.unwrap().contains("RecursionError"));

    let syntax = run("def broken(:").await;
    let e = syntax.error.unwrap();
    assert!(e.contains("SyntaxError") && e.contains("main.py"), "{e}");

    let raised = run("def g():\n    raise ValueError('bad input')\ng()").await;
    let e = raised.error.unwrap();
    assert!(
        e.starts_with("Traceback (most recent call last):") && e.contains("ValueError: bad input"),
        "{e}"
    );
}

/// The sandbox workers that are children of this process, by pid.
fn workers() -> Vec<u32> {
    let me = std::process::id().to_string();
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            let after = stat.rsplit_once(") ").map(|(_, r)| r).unwrap_or("");
            let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            after.split(' ').nth(1) == Some(me.as_str())
                && cmd.split(|b| *b == 0).any(|a| a == b"sandbox")
        })
        .collect()
}

#[tokio::test]
async fn workers_are_capped_confined_and_killed_as_a_group() {
    std::env::set_var("EXPERIENT_SANDBOX_EXE", env!("CARGO_BIN_EXE_experient"));
    experient::sandbox::set_max_workers(2);
    let cap = experient::sandbox::max_workers();
    // A descriptor without close-on-exec, as a launching shell may leave one to the server.
    let leaked = unsafe { libc::open(c"/dev/null".as_ptr(), libc::O_RDONLY) };
    assert!(leaked > 2);
    let watcher = std::thread::spawn(move || {
        let (mut most, mut seen) = (0, Vec::new());
        let t = std::time::Instant::now();
        while t.elapsed() < Duration::from_secs(4) {
            let now = workers();
            most = most.max(now.len());
            for pid in now {
                let fds: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
                    .map(|d| {
                        d.filter_map(|e| Some(e.ok()?.file_name().to_string_lossy().into_owned()))
                            .collect()
                    })
                    .unwrap_or_default();
                let cwd = std::fs::read_link(format!("/proc/{pid}/cwd")).ok();
                let limits =
                    std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap_or_default();
                let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
                let pgrp = stat
                    .rsplit_once(") ")
                    .and_then(|(_, r)| r.split(' ').nth(2).map(str::to_owned));
                seen.push((pid, fds, cwd, limits, pgrp));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        (most, seen)
    });
    let spin = Limits {
        time: Duration::from_millis(600),
        ..limits()
    };
    let runs: Vec<_> = (0..3 * cap)
        .map(|_| run_python("while True:\n    pass", &spin))
        .collect();
    for out in futures::future::join_all(runs).await {
        assert!(out.unwrap().error.unwrap().contains("TimeoutError"));
    }
    let (most, seen) = watcher.join().unwrap();
    assert!(
        most >= 1 && most <= cap,
        "{most} workers at once, cap {cap}"
    );
    let here = std::env::current_dir().unwrap();
    let (pid, fds, cwd, limits, pgrp) = seen
        .iter()
        .find(|s| s.2.is_some() && !s.3.is_empty())
        .expect("a worker was inspected");
    let mut fds = fds.clone();
    fds.sort();
    assert_eq!(fds, ["0", "1", "2"], "the worker holds more than its pipes");
    let cwd = cwd.as_ref().unwrap();
    assert_ne!(cwd, &here);
    assert!(
        cwd.to_string_lossy().contains("experient-sandbox-"),
        "{cwd:?}"
    );
    for (name, value) in [
        ("Max open files", "16"),
        ("Max processes", "0"),
        ("Max file size", "0"),
    ] {
        let line = limits.lines().find(|l| l.starts_with(name)).unwrap();
        assert!(line.split_whitespace().any(|w| w == value), "{line}");
    }
    assert_eq!(
        pgrp.as_deref(),
        Some(pid.to_string().as_str()),
        "the worker leads its own group"
    );
    // Killed at the deadline, whole: nothing is left running, and the directories are gone.
    std::thread::sleep(Duration::from_millis(200));
    assert!(workers().is_empty(), "workers outlived their deadline");
    assert!(!cwd.exists());
    unsafe { libc::close(leaked) };
}
