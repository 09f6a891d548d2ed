//! The `ringcast` binary. Everything lives in the library; see `engine::cli`.

#![deny(unsafe_code)]

#[cfg(not(feature = "alloc-stats"))]
#[global_allocator]
static GLOBAL: engine::io::alloc::Allocator = engine::io::alloc::Allocator;

#[cfg(feature = "alloc-stats")]
#[global_allocator]
static GLOBAL: engine::io::CountingAlloc<engine::io::alloc::Allocator> =
    engine::io::CountingAlloc(engine::io::alloc::Allocator);

fn main() -> std::process::ExitCode {
    engine::io::tune_allocator();
    engine::cli::main()
}
