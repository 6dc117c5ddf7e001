//! Writes `docs/reference/recipe.md` from the recipe settings' declarations
//! (`src/recipe/settings.rs`). A test fails while the checked-in file differs:
//!
//!     cargo run --example gen_reference

fn main() -> std::io::Result<()> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/reference/recipe.md");
    fs_err::create_dir_all(path.parent().expect("a file in a folder"))?;
    fs_err::write(&path, builder::recipe::settings::reference())?;
    eprintln!("wrote {}", path.display());
    Ok(())
}
