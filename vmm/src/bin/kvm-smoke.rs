//! `kvm-smoke`: checks that /dev/kvm can run a long-mode guest with paging,
//! and prints how long each phase took. Exits 0 on success.

use std::process::ExitCode;

use vmm::smoke::{self, ObservedExit};

fn main() -> ExitCode {
    match smoke::run() {
        Ok(report) => {
            println!("kvm-smoke: OK");
            println!(
                "  guest sum   {:#018x} (expected {:#018x})",
                report.sum,
                smoke::EXPECTED_SUM
            );
            println!(
                "  guest EFER  {:#x}  CR0 {:#x}  (long mode active, paging on)",
                report.efer, report.cr0
            );
            let io = report
                .exits
                .iter()
                .filter(|e| matches!(e, ObservedExit::IoOut { .. }))
                .count();
            println!(
                "  exits       {} ({} port I/O, 1 MMIO, 1 HLT)",
                report.exits.len(),
                io
            );
            println!("  VM create   {:>10.3?}", report.vm_create);
            println!("  vCPU setup  {:>10.3?}", report.vcpu_setup);
            println!("  run         {:>10.3?}", report.run);
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("kvm-smoke: FAILED: {e}");
            ExitCode::FAILURE
        }
    }
}
