//! The `ringcast` binary. Everything lives in the library; see `engine::cli`.

#![deny(unsafe_code)]

#[cfg(not(feature = "alloc-stats"))]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[cfg(feature = "alloc-stats")]
#[global_allocator]
static GLOBAL: engine::io::CountingAlloc<mimalloc::MiMalloc> =
    engine::io::CountingAlloc(mimalloc::MiMalloc);

fn main() -> std::process::ExitCode {
    engine::io::tune_allocator();
    engine::cli::main()
}
