//! Project automation that cargo alone cannot express: toolchain setup, privileged test runs,
//! the live demo, deployment checks and packaging.

mod bench;
mod bench_load;
mod bench_progtime;
mod cmd;
mod demo;
mod deploy_check;
mod kernel_matrix;
mod package;
mod ring;
mod sensor_cost;
mod setup;
mod test;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "phi-audit project tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install everything the build and the tests need (idempotent; a second run only checks).
    Setup,
    /// Set up, build, and run every test, the privileged kernel tests included (needs root).
    Test(test::TestArgs),
    /// Set up, build, and run the agent live on a demo directory of synthetic patient records.
    Demo(demo::DemoArgs),
    /// Check deploy/: systemd-analyze on the units, kubernetes-validate and checkov on the
    /// Kubernetes manifests (also part of `test`).
    CheckDeploy(deploy_check::CheckDeployArgs),
    /// Build release binaries and write a .deb and a .tar.gz (with install.sh) to
    /// target/package/.
    Package(package::PackageArgs),
    /// Measure host overhead (against auditd and bpftrace), completeness under load, and the
    /// collector's ingest and queries; writes BENCHMARKS.md (needs root).
    Bench(bench::BenchArgs),
    /// Boot Debian's own kernels under qemu (cached in target/kernel-matrix/) and prove on each,
    /// and on the host kernel, that the agent records opens, execs and connects: PASS/FAIL per
    /// kernel with the reason (needs root for the host row).
    KernelMatrix(kernel_matrix::KernelMatrixArgs),
    /// One benchmark workload in a process of its own (used by `bench`).
    #[command(hide = true)]
    BenchWorker(bench_load::WorkerArgs),
    /// One open or rename through an io_uring (used by `kernel-matrix`).
    #[command(hide = true)]
    Ring(ring::RingArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.task {
        Task::Setup => setup::run(),
        Task::Test(args) => test::run(&args),
        Task::Demo(args) => demo::run(&args),
        Task::CheckDeploy(args) => deploy_check::run(&args),
        Task::Package(args) => package::run(&args),
        Task::Bench(args) => bench::run(&args),
        Task::KernelMatrix(args) => kernel_matrix::run(&args),
        Task::BenchWorker(args) => bench_load::run(&args),
        Task::Ring(args) => ring::run(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
