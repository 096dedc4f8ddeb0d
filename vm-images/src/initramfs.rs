//! Builds the guest's initramfs: the static init, the modules in load order,
//! and the spec telling the init what to run.

use crate::cpio::{self, Entry};
use crate::guest::{GuestModule, GuestSpec, SPEC_PATH};
use crate::Error;

/// A module to put in the initramfs.
#[derive(Debug, Clone)]
pub struct ModuleFile {
    pub name: String,
    pub data: Vec<u8>,
    /// Kept xz-compressed; the kernel decompresses it.
    pub compressed: bool,
}

/// Builds the archive. `spec.modules` is filled from `modules` (their order is
/// the load order).
pub fn build(init: &[u8], modules: &[ModuleFile], mut spec: GuestSpec) -> Result<Vec<u8>, Error> {
    let mut entries = vec![
        Entry::dir("dev", 0o755),
        Entry::char_dev("dev/console", 0o600, 5, 1),
        Entry::char_dev("dev/null", 0o666, 1, 3),
        Entry::dir("proc", 0o555),
        Entry::dir("sys", 0o555),
        Entry::dir("newroot", 0o755),
        Entry::dir("tmp", 0o1777),
        Entry::dir("crest", 0o755),
        Entry::dir("crest/modules", 0o755),
        Entry::file("init", 0o755, init.to_vec()),
    ];
    spec.modules.clear();
    for (i, m) in modules.iter().enumerate() {
        let ext = if m.compressed { "ko.xz" } else { "ko" };
        let path = format!("crest/modules/{i:02}-{}.{ext}", m.name);
        entries.push(Entry::file(&path, 0o644, m.data.clone()));
        spec.modules.push(GuestModule {
            name: m.name.clone(),
            path: format!("/{path}"),
            compressed: m.compressed,
        });
    }
    let json = serde_json::to_vec_pretty(&spec).map_err(|e| Error::Other(format!("spec: {e}")))?;
    entries.push(Entry::file(SPEC_PATH, 0o644, json));
    let mut out = Vec::new();
    cpio::write_archive(&mut out, &entries).map_err(|e| Error::io("write initramfs", e))?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> GuestSpec {
        GuestSpec {
            modules: vec![],
            argv: vec!["/bin/true".into()],
            env: vec![("PATH".into(), "/usr/bin:/bin".into())],
            workdir: "/".into(),
            hostname: "crest-guest".into(),
            msize: 512000,
        }
    }

    #[test]
    fn lists_expected_files_and_spec() {
        let mods = vec![
            ModuleFile {
                name: "virtio".into(),
                data: b"\x7fELFa".to_vec(),
                compressed: false,
            },
            ModuleFile {
                name: "9p".into(),
                data: vec![0xFD, b'7', b'z'],
                compressed: true,
            },
        ];
        let img = build(b"\x7fELFinit", &mods, spec()).unwrap();
        let entries = cpio::read_archive(&img).unwrap();
        let names: Vec<_> = entries.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "dev",
                "dev/console",
                "dev/null",
                "proc",
                "sys",
                "newroot",
                "tmp",
                "crest",
                "crest/modules",
                "init",
                "crest/modules/00-virtio.ko",
                "crest/modules/01-9p.ko.xz",
                "crest/guest.json"
            ]
        );
        let init = entries.iter().find(|e| e.name == "init").unwrap();
        assert_eq!(init.mode, cpio::S_IFREG | 0o755);
        assert_eq!(init.data, b"\x7fELFinit");
        let console = entries.iter().find(|e| e.name == "dev/console").unwrap();
        assert_eq!(
            (console.mode & 0o170000, console.rdev),
            (cpio::S_IFCHR, (5, 1))
        );
        let spec: GuestSpec = serde_json::from_slice(&entries.last().unwrap().data).unwrap();
        assert_eq!(spec.argv, ["/bin/true"]);
        assert_eq!(
            spec.modules,
            vec![
                GuestModule {
                    name: "virtio".into(),
                    path: "/crest/modules/00-virtio.ko".into(),
                    compressed: false
                },
                GuestModule {
                    name: "9p".into(),
                    path: "/crest/modules/01-9p.ko.xz".into(),
                    compressed: true
                },
            ]
        );
    }
}
