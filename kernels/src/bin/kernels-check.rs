//! `make kernels-check`: NVRTC compiles every kernel to PTX for compute_80 and compute_90 (the
//! Hopper-only wgmma source for compute_90a), with
//! warnings as errors. Needs no GPU (NVRTC comes from the torch wheel), so CI catches kernel errors.
//! `--emit DIR` also writes each PTX file there (for ptxas -v / cuobjdump resource checks).
use std::process::ExitCode;

fn main() -> ExitCode {
    let emit = std::env::args()
        .skip_while(|a| a != "--emit")
        .nth(1)
        .map(std::path::PathBuf::from);
    let version = match kernels::compile::nvrtc_version() {
        Ok(v) => v,
        Err(e) => {
            eprintln!("kernels-check: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut failed = 0;
    for src in kernels::sources() {
        for &arch in kernels::check_arches(src.name) {
            let started = std::time::Instant::now();
            match kernels::compile::compile_ptx(&src, arch) {
                Ok(ptx) => {
                    if let Some(dir) = &emit {
                        let path =
                            dir.join(format!("{}.{arch}.ptx", src.name.trim_end_matches(".cu")));
                        if let Err(e) =
                            std::fs::create_dir_all(dir).and_then(|_| std::fs::write(&path, &ptx))
                        {
                            eprintln!("FAIL writing {}: {e}", path.display());
                            failed += 1;
                        }
                    }
                    let entries = ptx.lines().filter(|l| l.contains(".entry")).count();
                    // every name the Rust wrappers launch must exist (catches a renamed kernel here,
                    // not on the GPU host)
                    let expected = match src.name {
                        "attention.cu" => kernels::attention::kernel_names(),
                        kernels::SM90A_ATTENTION => kernels::attention::sm90a_kernel_names(),
                        _ => vec![],
                    };
                    {
                        for name in expected {
                            if !ptx.contains(&format!(".entry {name}(")) {
                                eprintln!("FAIL {} {arch}: no kernel {name}", src.name);
                                failed += 1;
                            }
                        }
                    }
                    println!(
                        "ok   {:<14} {arch}  {entries:>3} kernels  {:>5.1} s  (NVRTC {}.{})",
                        src.name,
                        started.elapsed().as_secs_f64(),
                        version.0,
                        version.1
                    );
                }
                Err(e) => {
                    failed += 1;
                    eprintln!("FAIL {} {arch}: {e}", src.name);
                }
            }
        }
    }
    if failed > 0 {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
