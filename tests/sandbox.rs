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
