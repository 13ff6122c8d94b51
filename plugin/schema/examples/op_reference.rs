//! Prints the op reference section of the README from the op table.
fn main() {
    print!("{}", power_retention_schema::markdown_reference());
}
