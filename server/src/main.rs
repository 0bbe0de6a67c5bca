//! `dmar-server` binary. The network service arrives with the gRPC control plane; until
//! then the binary reports what the unit model advertises.

fn main() {
    let cap = dmar_server::unit::regs::cap_value();
    let ecap = dmar_server::unit::regs::ecap_value();
    println!("dmar-server: VT-d unit model, CAP={cap:#018x} ECAP={ecap:#018x}");
    println!("the gRPC service is not available in this build");
}
