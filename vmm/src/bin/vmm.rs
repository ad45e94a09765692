//! `vmm`: runs one microVM. See `vmm --help`.

fn main() -> std::process::ExitCode {
    vmm::entry::main()
}
