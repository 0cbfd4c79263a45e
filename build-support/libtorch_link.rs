// Shared by the build.rs of every package that links libtorch (include!d, not a crate).
//
// - rpath to libtorch's lib folder, so binaries and test executables run without LD_LIBRARY_PATH;
// - `-Wl,--no-as-needed -ltorch_cuda` when libtorch_cuda.so exists: nothing references a symbol of
//   it directly, so --as-needed drops it and CUDA silently reports unavailable (tch issue 980).
fn link_libtorch() {
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    let Some(root) = std::env::var_os("LIBTORCH") else {
        return;
    };
    let lib = std::path::Path::new(&root).join("lib");
    let lib = lib.canonicalize().unwrap_or(lib);
    println!("cargo:rustc-link-search=native={}", lib.display());
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
    // cudarc loads NCCL as `libnccl.so`, a name the NCCL wheel lacks: `make setup` makes the link in
    // .venv/nccl, and this rpath lets cudarc's dlopen (called from this binary) find it.
    println!("cargo:rerun-if-env-changed=LLAVA_SCO_VENV");
    if let Some(venv) = std::env::var_os("LLAVA_SCO_VENV") {
        let nccl = std::path::Path::new(&venv).join("nccl");
        if let Ok(nccl) = nccl.canonicalize() {
            println!("cargo:rustc-link-arg=-Wl,-rpath,{}", nccl.display());
        }
    }
    if lib.join("libtorch_cuda.so").exists() {
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
        println!("cargo:rustc-link-arg=-ltorch_cuda");
        println!("cargo:rustc-link-arg=-Wl,--as-needed");
    }
}
