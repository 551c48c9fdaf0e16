fn main() {
    std::process::exit(stasis::cli::main());
}
