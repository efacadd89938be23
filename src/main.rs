fn main() -> std::process::ExitCode {
    onnx_slice::cli::main()
}
