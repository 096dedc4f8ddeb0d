//! Builds the C parts of the workloads (a C compiler is present wherever
//! Rust links: rustc uses `cc` as its linker on Linux).
fn main() {
    println!("cargo:rerun-if-changed=c/pool.c");
    cc::Build::new()
        .file("c/pool.c")
        .flag("-pthread")
        .warnings(true)
        .compile("crest_pool");
}
