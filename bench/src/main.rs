//! The load generator. The bench issue fills it with scenarios (idle, login, chat); until then it
//! says so instead of pretending to measure.

fn main() {
    eprintln!("bench: no scenarios yet (see the bench issue); nothing was measured");
    std::process::exit(2);
}
