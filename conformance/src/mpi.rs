//! The MPI section's toolchains and the job it checkpoints: which launcher and
//! compiler a case uses (Debian's MPICH, Debian's Open MPI, or a vendor's
//! `--mpi PATH`), how the launcher is told to keep ranks on TCP, and how the
//! job's output is read (`workloads/mpi/ring.c`: "progress N" lines, then one
//! "checksum …" line).

use std::path::{Path, PathBuf};
use std::process::Command;

/// The MPI program every MPI case runs, compiled with the case's `mpicc`.
pub const RING_C: &str = include_str!("../../workloads/mpi/ring.c");

/// Ranks per job.
pub const RANKS: u32 = 4;

/// Which MPI a case runs with (the case's first argument).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flavor {
    /// Debian's MPICH (`mpicc.mpich`, `mpiexec.mpich`), ch4:ucx kept on TCP.
    Mpich,
    /// Debian's Open MPI (`mpicc.openmpi`, `mpirun.openmpi`), btl tcp,self.
    OpenMpi,
    /// The launcher given with `--mpi PATH`, with `--mpi-args`.
    Vendor,
}

impl Flavor {
    pub fn parse(word: &str) -> Result<Flavor, String> {
        match word {
            "mpich" => Ok(Flavor::Mpich),
            "openmpi" => Ok(Flavor::OpenMpi),
            "vendor" => Ok(Flavor::Vendor),
            other => Err(format!(
                "unknown MPI flavour {other:?} (mpich, openmpi or vendor)"
            )),
        }
    }
}

/// How to build and launch the job with one MPI.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Toolchain {
    pub mpicc: PathBuf,
    pub launcher: PathBuf,
    /// Launcher arguments before `-n RANKS PROGRAM ARGS`.
    pub launcher_args: Vec<String>,
    /// Environment the launcher needs (transport selection, root permission).
    pub env: Vec<(String, String)>,
}

/// The first directory on PATH holding `name`.
pub fn find_on_path(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|p| {
        std::env::split_paths(&p)
            .map(|d| d.join(name))
            .find(|f| f.is_file())
    })
}

/// The toolchain of `flavor`, or why the case cannot run here (it is then
/// reported as ignored with that reason).
pub fn toolchain(
    flavor: Flavor,
    vendor: Option<&Path>,
    vendor_args: &[String],
) -> Result<Toolchain, String> {
    let need = |name: &str, package: &str| {
        find_on_path(name).ok_or_else(|| format!("needs {name} on PATH (Debian package {package})"))
    };
    match flavor {
        Flavor::Mpich => Ok(Toolchain {
            mpicc: need("mpicc.mpich", "libmpich-dev")?,
            launcher: need("mpiexec.mpich", "mpich")?,
            launcher_args: Vec::new(),
            // Debian's MPICH is built with ch4:ucx; these transports keep the
            // ranks on TCP (no shared-memory transport between them).
            env: vec![("UCX_TLS".into(), "tcp,self".into())],
        }),
        Flavor::OpenMpi => Ok(Toolchain {
            mpicc: need("mpicc.openmpi", "libopenmpi-dev")?,
            launcher: need("mpirun.openmpi", "openmpi-bin")?,
            launcher_args: [
                "--oversubscribe",
                "--mca",
                "btl",
                "tcp,self",
                "--mca",
                "pml",
                "ob1",
                // Loopback only: its btl leaves lo out by default, and a
                // QEMU guest has no other interface.
                "--mca",
                "btl_tcp_if_include",
                "lo",
                "--mca",
                "oob_tcp_if_include",
                "lo",
            ]
            .map(String::from)
            .to_vec(),
            env: vec![
                ("OMPI_ALLOW_RUN_AS_ROOT".into(), "1".into()),
                ("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM".into(), "1".into()),
            ],
        }),
        Flavor::Vendor => {
            let launcher = vendor
                .ok_or("needs a vendor launcher: pass --mpi PATH (and --mpi-args ARGS)")?
                .to_path_buf();
            if !launcher.is_file() {
                return Err(format!("--mpi {}: no such file", launcher.display()));
            }
            // The vendor's compiler wrapper beside its launcher (Debian's
            // `mpiexec.mpich` goes with `mpicc.mpich`), else on PATH.
            let suffix = launcher
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.split_once('.'))
                .map(|(_, s)| format!("mpicc.{s}"));
            let dir = launcher.parent().unwrap_or(Path::new("/"));
            let mpicc = suffix
                .into_iter()
                .chain(["mpicc".to_string()])
                .map(|n| dir.join(n))
                .find(|p| p.is_file())
                .or_else(|| find_on_path("mpicc"))
                .ok_or_else(|| {
                    format!(
                        "needs mpicc beside {} or on PATH to build the job",
                        launcher.display()
                    )
                })?;
            Ok(Toolchain {
                mpicc,
                launcher,
                launcher_args: vendor_args.to_vec(),
                env: Vec::new(),
            })
        }
    }
}

impl Toolchain {
    /// The command that runs `exe ARGS` on [`RANKS`] ranks.
    pub fn command(&self, exe: &Path, args: &[String]) -> Command {
        let mut c = Command::new(&self.launcher);
        c.args(&self.launcher_args)
            .arg("-n")
            .arg(RANKS.to_string())
            .arg(exe)
            .args(args);
        c.envs(self.env.iter().map(|(k, v)| (k, v)));
        c
    }

    /// The launcher command line, for messages.
    pub fn describe(&self, exe: &Path, args: &[String]) -> String {
        let env: Vec<String> = self.env.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let mut words = env;
        words.push(self.launcher.display().to_string());
        words.extend(self.launcher_args.iter().cloned());
        words.extend(["-n".into(), RANKS.to_string(), exe.display().to_string()]);
        words.extend(args.iter().cloned());
        words.join(" ")
    }

    /// Compiles [`RING_C`] into `exe` (the source is written beside it).
    pub fn compile(&self, exe: &Path) -> Result<(), String> {
        let src = exe.with_extension("c");
        std::fs::write(&src, RING_C).map_err(|e| format!("{}: {e}", src.display()))?;
        let out = Command::new(&self.mpicc)
            .arg("-O2")
            .arg("-o")
            .arg(exe)
            .arg(&src)
            .output()
            .map_err(|e| format!("cannot run {}: {e}", self.mpicc.display()))?;
        if !out.status.success() {
            return Err(format!(
                "{} failed to build {}: {}",
                self.mpicc.display(),
                src.display(),
                String::from_utf8_lossy(&out.stderr).trim_end()
            ));
        }
        Ok(())
    }
}

/// What the job printed so far: the progress lines in order and the final checksum.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct JobOutput {
    pub progress: Vec<u64>,
    pub checksum: Option<String>,
}

impl JobOutput {
    pub fn parse(text: &str) -> JobOutput {
        let mut out = JobOutput::default();
        for line in text.lines() {
            if let Some(n) = line.strip_prefix("progress ") {
                if let Ok(n) = n.trim().parse() {
                    out.progress.push(n);
                }
            } else if let Some(rest) = line.strip_prefix("checksum ") {
                out.checksum = Some(rest.trim().to_string());
            }
        }
        out
    }

    /// The last iteration reported.
    pub fn last(&self) -> u64 {
        self.progress.last().copied().unwrap_or(0)
    }

    /// Whether every iteration 1..=n was reported exactly once, in order: no
    /// output lost or repeated across a dump and restore.
    pub fn complete(&self, n: u64) -> Result<(), String> {
        let expected: Vec<u64> = (1..=n).collect();
        if self.progress == expected {
            return Ok(());
        }
        let first_bad = self
            .progress
            .iter()
            .zip(&expected)
            .position(|(a, b)| a != b)
            .unwrap_or(self.progress.len().min(expected.len()));
        Err(format!(
            "the job's progress lines are not 1..={n} once each: {} lines, first difference at line {} ({:?} instead of {:?})",
            self.progress.len(),
            first_bad + 1,
            self.progress.get(first_bad),
            expected.get(first_bad)
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_is_parsed_and_checked() {
        let o = JobOutput::parse(
            "progress 1\nprogress 2\nnoise\nprogress 3\nchecksum 00ff iterations 3 ranks 4\n",
        );
        assert_eq!(o.progress, vec![1, 2, 3]);
        assert_eq!(o.checksum.as_deref(), Some("00ff iterations 3 ranks 4"));
        assert_eq!(o.last(), 3);
        o.complete(3).unwrap();
        let e = o.complete(4).unwrap_err();
        assert!(e.contains("3 lines"), "{e}");
        let dup = JobOutput::parse("progress 1\nprogress 2\nprogress 2\nprogress 3\n");
        let e = dup.complete(3).unwrap_err();
        assert!(e.contains("at line 3 (Some(2) instead of Some(3))"), "{e}");
    }

    #[test]
    fn flavours_and_vendor_launcher() {
        assert_eq!(Flavor::parse("mpich"), Ok(Flavor::Mpich));
        assert!(Flavor::parse("lam").is_err());
        let e = toolchain(Flavor::Vendor, None, &[]).unwrap_err();
        assert!(e.contains("--mpi PATH"), "{e}");
        let e = toolchain(Flavor::Vendor, Some(Path::new("/nonexistent/mpirun")), &[]).unwrap_err();
        assert!(e.contains("no such file"), "{e}");
        let d = tempfile::tempdir().unwrap();
        let (run, cc) = (d.path().join("mpirun"), d.path().join("mpicc"));
        std::fs::write(&run, "").unwrap();
        std::fs::write(&cc, "").unwrap();
        let t = toolchain(Flavor::Vendor, Some(&run), &["--x".into()]).unwrap();
        assert_eq!((t.mpicc, t.launcher_args), (cc, vec!["--x".to_string()]));
        let (run2, cc2) = (d.path().join("mpiexec.v2"), d.path().join("mpicc.v2"));
        std::fs::write(&run2, "").unwrap();
        std::fs::write(&cc2, "").unwrap();
        assert_eq!(
            toolchain(Flavor::Vendor, Some(&run2), &[]).unwrap().mpicc,
            cc2
        );
        let c = t.launcher.clone();
        let line = Toolchain {
            mpicc: PathBuf::new(),
            launcher: c.clone(),
            launcher_args: vec!["--x".into()],
            env: vec![("A".into(), "1".into())],
        }
        .describe(Path::new("/w/ring"), &["9".into()]);
        assert_eq!(line, format!("A=1 {} --x -n 4 /w/ring 9", c.display()));
    }
}
