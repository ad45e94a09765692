//! KVM test: runs the long-mode self-test guest through the library.

use std::path::Path;

#[test]
fn long_mode_guest_produces_expected_exits() {
    if !Path::new("/dev/kvm").exists() {
        println!("SKIPPED: /dev/kvm is absent");
        return;
    }
    let report = vmm::smoke::run().expect("self-test guest");
    assert_eq!(report.sum, vmm::smoke::EXPECTED_SUM);
    assert_eq!(report.exits.len(), 12);
    assert_eq!(report.exits.last(), Some(&vmm::smoke::ObservedExit::Hlt));
}
