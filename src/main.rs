//! The `onnx-slice` command: flags into the library's options, exit codes, progress and signals
//! (`cli`); everything else is the library, `onnx_slice`.
mod cli;

fn main() -> std::process::ExitCode {
    cli::main()
}
