//! The `shop` binary: for now a placeholder; it runs the shop module on
//! `sluice-host` once the host lands.

fn main() {
    println!("shop: the host wiring lands with sluice-host");
}
