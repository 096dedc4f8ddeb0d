//! crest's developer tasks (`cargo xtask …`).

mod conformance;
mod criu;
mod matrix;
mod run;
mod support;
mod vs_criu;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Result};
use clap::{Parser, Subcommand};
use crest_vm::cache::Cache;

use crate::support::{KernelChoice, VmOpts};

#[derive(Debug, Parser)]
#[command(name = "xtask", about = "crest developer tasks")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Run the conformance suite on kernels (default: host and 6.1) and print
    /// the requirement × kernel matrix.
    ///
    /// With no --kernel it runs on `host` (natively) and `6.1` (Debian
    /// bookworm's kernel in QEMU); `--kernel all` means host plus every catalog
    /// kernel (5.10, 6.1, 6.12, 7.2). It builds the workspace binaries (debug
    /// profile) first, runs target/debug/crest-conformance on each kernel, and
    /// writes report-<kernel>.json, junit-<kernel>.xml, matrix.md and
    /// matrix.json to --out.
    ///
    /// Exit status: 0 the gate passed; 1 a must-priority case failed or a
    /// baseline case regressed; 3 a kernel gave no usable report (boot
    /// failure, timeout, harness crash); 2 xtask itself failed.
    Conformance(conformance::ConformanceArgs),
    /// Regenerate REQUIREMENTS.md's status column and kernel matrix from the
    /// committed reports in conformance/reports (written by `conformance
    /// --record`); `--check` only says whether it is up to date (exit 1 if not).
    Requirements {
        #[arg(long)]
        check: bool,
    },
    /// List the kernel catalog and what is cached.
    Kernels,
    /// Fetch kernels into the cache (default: every catalog kernel).
    Images {
        /// Catalog version to fetch (or `all`); repeatable.
        #[arg(long = "kernel", value_name = "V")]
        kernels: Vec<String>,
        /// Debian archive URL (default: $CREST_DEBIAN_MIRROR, else the system's apt sources).
        #[arg(long)]
        mirror: Option<String>,
    },
    /// Run one command in a guest of a kernel and print its output (debugging aid).
    VmRun(VmRunArgs),
    /// Run the criterion benchmarks (`cargo bench -p crest-bench`), or with
    /// --vs-criu crest and CRIU side by side on one workload (CRIU 4.1 is
    /// provisioned into the cache when the system has none or an older one).
    Bench {
        /// Compare with CRIU instead: interleaved samples, medians, ratios,
        /// printed as a markdown table.
        #[arg(long)]
        vs_criu: bool,
        #[command(flatten)]
        vs: vs_criu::VsCriuArgs,
        /// Arguments for `cargo bench` (without --vs-criu).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

#[derive(Debug, clap::Args)]
struct VmRunArgs {
    /// Catalog version (5.10, 6.1, 6.12, 7.2) or `host`.
    #[arg(long, default_value = "6.1", value_name = "V")]
    kernel: String,
    /// Your own kernel image instead of a catalog kernel.
    #[arg(long, value_name = "PATH")]
    kernel_image: Option<PathBuf>,
    /// The `lib/modules/<release>` tree of --kernel-image.
    #[arg(long, value_name = "DIR", requires = "kernel_image")]
    modules_dir: Option<PathBuf>,
    /// Seconds before the VM is killed.
    #[arg(long, default_value_t = 300)]
    timeout: u64,
    /// Working directory of the command.
    #[arg(long, default_value = "/")]
    workdir: String,
    /// Extra environment variable KEY=VALUE; repeatable.
    #[arg(long = "env", value_name = "KEY=VALUE")]
    env: Vec<String>,
    #[command(flatten)]
    vm: VmOpts,
    /// The command and its arguments.
    #[arg(last = true, required = true)]
    command: Vec<String>,
}

/// `cargo xtask requirements [--check]`.
pub fn requirements_cmd(check: bool) -> Result<i32> {
    use crest_conformance::provenance;
    let root = support::workspace_root();
    let md_path = root.join("REQUIREMENTS.md");
    let md = std::fs::read_to_string(&md_path)
        .map_err(|e| anyhow::anyhow!("read {}: {e}", md_path.display()))?;
    let reports = provenance::read_reports(&root.join("conformance").join(provenance::REPORTS_DIR))
        .map_err(|e| anyhow::anyhow!(e))?;
    let out = provenance::render(&md, &reports).map_err(|e| anyhow::anyhow!(e))?;
    let labels: Vec<&str> = reports.iter().map(|r| r.label.as_str()).collect();
    match provenance::first_difference(&md, &out) {
        None => {
            println!(
                "REQUIREMENTS.md is what the committed reports say ({})",
                labels.join(", ")
            );
            Ok(0)
        }
        Some((n, have, want)) if check => {
            println!(
                "REQUIREMENTS.md is out of date at line {n}:
  {have}
the reports ({}) give
  {want}
run `cargo xtask requirements`",
                labels.join(", ")
            );
            Ok(1)
        }
        Some(_) => {
            std::fs::write(&md_path, out)
                .map_err(|e| anyhow::anyhow!("write {}: {e}", md_path.display()))?;
            println!(
                "REQUIREMENTS.md regenerated from the committed reports ({})",
                labels.join(", ")
            );
            Ok(0)
        }
    }
}

fn kernels() -> Result<i32> {
    let cache = Cache::new(Cache::default_root()?);
    println!("cache: {}", cache.root.join("kernels").display());
    println!("{:<6} {:<28} {:<26} status", "kernel", "suites", "release");
    println!(
        "{:<6} {:<28} {:<26} native (the running kernel, {})",
        "host",
        "-",
        "-",
        host_release()
    );
    for st in cache.status() {
        let suites = st.entry.suites.join(", ");
        match (&st.manifest, &st.problem) {
            (Some(m), _) => {
                let pk: Vec<String> = m
                    .packages
                    .iter()
                    .map(|p| {
                        format!(
                            "{}={} sha256:{}",
                            p.name,
                            p.version,
                            &p.sha256[..16.min(p.sha256.len())]
                        )
                    })
                    .collect();
                println!(
                    "{:<6} {:<28} {:<26} cached, {} modules; {}",
                    st.entry.version,
                    suites,
                    m.release,
                    m.modules.len(),
                    pk.join(", ")
                );
            }
            (None, Some(p)) => println!(
                "{:<6} {:<28} {:<26} cache unusable: {p}",
                st.entry.version, suites, "?"
            ),
            (None, None) => println!(
                "{:<6} {:<28} {:<26} not cached (fetched on first use)",
                st.entry.version, suites, "?"
            ),
        }
    }
    println!("any other kernel: --kernel-image PATH [--modules-dir DIR]");
    Ok(0)
}

fn host_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

fn images(versions: Vec<String>, mirror: Option<String>) -> Result<i32> {
    let versions = if versions.is_empty() || versions.iter().any(|v| v == "all") {
        crest_vm::catalog::available_versions()
            .iter()
            .map(|s| s.to_string())
            .collect()
    } else {
        versions
    };
    let cache = Cache::new(Cache::default_root()?);
    let mut failed = 0;
    for v in versions {
        let start = std::time::Instant::now();
        match cache.ensure(&v, mirror.as_deref(), &|m| eprintln!("[{v}] {m}")) {
            Ok((k, cached)) => eprintln!(
                "[{v}] {} {} in {:.1} s ({} modules)",
                k.release.as_deref().unwrap_or("?"),
                if cached { "cached" } else { "fetched" },
                start.elapsed().as_secs_f64(),
                k.modules.len()
            ),
            Err(e) => {
                eprintln!("[{v}] error: {e}");
                failed += 1;
            }
        }
    }
    Ok(i32::from(failed > 0))
}

fn vm_run(a: VmRunArgs) -> Result<i32> {
    let choice = match &a.kernel_image {
        Some(img) => KernelChoice::Custom {
            image: img.clone(),
            modules: a.modules_dir.clone(),
        },
        None => support::choose_kernels(std::slice::from_ref(&a.kernel), None, None, &[])?
            .pop()
            .ok_or_else(|| anyhow::anyhow!("no kernel"))?,
    };
    let init = if choice == KernelChoice::Host {
        None
    } else {
        support::ensure_qemu()?;
        Some(support::build_guest_init()?)
    };
    let mut env = Vec::new();
    for kv in &a.env {
        let Some((k, v)) = kv.split_once('=') else {
            bail!("--env {kv}: expected KEY=VALUE");
        };
        env.push((k.to_string(), v.to_string()));
    }
    let label = choice.label();
    let spec = run::RunSpec {
        kernel: &choice,
        argv: a.command.clone(),
        env,
        workdir: a.workdir.clone(),
        run_dir: support::target_dir()
            .join("xtask")
            .join("vm-run")
            .join(&label),
        timeout: Duration::from_secs(a.timeout),
        vm: &a.vm,
        init: init.as_deref(),
    };
    let ran = run::run(&spec, &mut |_| {}, &|m| eprintln!("[{label}] {m}"))?;
    run::print_file(&ran.stdout, false);
    run::print_file(&ran.stderr, true);
    if let Some(c) = &ran.console_log {
        eprintln!("[{label}] console log: {}", c.display());
    }
    match (&ran.failure, ran.exit_code) {
        (Some(f), _) => {
            eprintln!("[{label}] FAILED after {:.1} s: {f}", ran.seconds);
            Ok(1)
        }
        (None, Some(code)) => {
            eprintln!(
                "[{label}] exit {code} after {:.1} s (kernel {}{})",
                ran.seconds,
                ran.kernel_release.as_deref().unwrap_or("?"),
                match ran.cached {
                    Some(true) => ", cached",
                    Some(false) => ", fetched",
                    None => "",
                }
            );
            Ok(code)
        }
        (None, None) => Ok(1),
    }
}

fn bench(args: Vec<String>) -> Result<i32> {
    let st =
        std::process::Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
            .current_dir(support::workspace_root())
            .args(["bench", "-p", "crest-bench"])
            .args(args)
            .status()?;
    Ok(st.code().unwrap_or(1))
}

fn main() {
    vs_criu::hog_main_if_requested();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
                tracing_subscriber::EnvFilter::new("warn,xtask=info,crest_vm=info")
            }),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let r = match cli.cmd {
        Cmd::Conformance(a) => conformance::main(a),
        Cmd::Requirements { check } => requirements_cmd(check),
        Cmd::Kernels => kernels(),
        Cmd::Images { kernels, mirror } => images(kernels, mirror),
        Cmd::VmRun(a) => vm_run(a),
        Cmd::Bench { vs_criu, vs, args } => {
            if vs_criu {
                vs_criu::main(vs)
            } else {
                bench(args)
            }
        }
    };
    match r {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::exit(2);
        }
    }
}
