//! A real shell job: `sh -c` running a loop that writes through a subshell on
//! every iteration, with a background child writing its own lines, both
//! paused mid-run until `go`. The workload first runs the same script
//! uninterrupted (with `go` already there) for the expected output, then
//! execs the shell, so the shell itself is the process the suite dumps.
//! The script writes `result`: `ok` when its output matches the
//! uninterrupted run byte for byte.
//!
//! `wl-shell --ctl DIR`

use crest_workloads::support::setup_failed;
use crest_workloads::Ctl;
use std::os::unix::process::CommandExt;
use std::process::Command;

/// `$1`: the directory to work in. Writes `ready` (the shell's pid) at
/// iteration 10 and waits there for `go`; so does the background child at
/// its line 5. Small, because every iteration execs under QEMU's emulation. `$2` = "check" compares with `expected` and writes `result`.
const SCRIPT: &str = r#"
set -e
cd "$1"
: > out
background() {
  n=0
  while [ $n -lt 16 ]; do
    echo "bg $n $((n * 7))"
    n=$((n + 1))
    if [ $n -eq 5 ]; then
      while [ ! -e go ]; do sleep 0.05; done
    fi
    sleep 0.01
  done > bg.out
}
background &
bg=$!
i=0
while [ $i -lt 40 ]; do
  (echo "line $i $((i * i)) $(echo sub | tr a-z A-Z)") >> out
  i=$((i + 1))
  if [ $i -eq 10 ]; then
    echo $$ > ready.tmp && mv ready.tmp ready
    while [ ! -e go ]; do sleep 0.05; done
  fi
done
wait $bg
cat bg.out >> out
if [ "$2" = check ]; then
  if cmp -s out expected; then echo ok > result.tmp; else echo "output differs from an uninterrupted run" > result.tmp; fi
  mv result.tmp result
fi
"#;

fn main() {
    let (ctl, _) = Ctl::from_args();
    let reference = ctl.path("uninterrupted");
    std::fs::create_dir_all(&reference).unwrap_or_else(|_| setup_failed("uninterrupted dir"));
    std::fs::write(reference.join("go"), "").unwrap_or_else(|_| setup_failed("go"));
    let status = Command::new("sh")
        .args(["-c", SCRIPT, "sh"])
        .arg(&reference)
        .status()
        .unwrap_or_else(|_| setup_failed("the uninterrupted run"));
    if !status.success() {
        setup_failed("the uninterrupted run failed");
    }
    std::fs::copy(reference.join("out"), ctl.path("expected"))
        .unwrap_or_else(|_| setup_failed("expected output"));
    let err = Command::new("sh")
        .args(["-c", SCRIPT, "sh"])
        .arg(ctl.dir())
        .arg("check")
        .exec();
    setup_failed(&format!("exec sh: {err}"));
}
