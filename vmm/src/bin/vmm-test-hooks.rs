//! `vmm-test-hooks`: the `vmm` command built with the `test-hooks` feature
//! (see `vmm::test_hooks`), for the security suite only.

fn main() -> std::process::ExitCode {
    vmm::entry::main()
}
