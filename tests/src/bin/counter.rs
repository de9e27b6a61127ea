//! The demo program: prints an ever-growing count with its pid every 0.2 s, so that a log shows
//! whether a restored process carries on from where it was dumped.
#![forbid(unsafe_code)]

use std::io::Write;
use std::time::Duration;

fn main() {
    let pid = std::process::id();
    let stdout = std::io::stdout();
    let mut count: u64 = 0;
    loop {
        count += 1;
        let mut out = stdout.lock();
        // A closed log is no reason to stop counting: the state lives in memory.
        let _ = writeln!(out, "count={count} pid={pid}");
        let _ = out.flush();
        drop(out);
        std::thread::sleep(Duration::from_millis(200));
    }
}
