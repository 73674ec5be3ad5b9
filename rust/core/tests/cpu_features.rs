//! Each vector path runs code compiled with `#[target_feature(enable = ...)]`
//! for a list of CPU features; running it on a CPU without one of them is
//! undefined behaviour. The `cpu_path!` macro derives both the attributes and
//! the detection from one list per path; these tests check that detection
//! requires every feature of that list, and that no other `target_feature`
//! attribute or feature detection exists in the crate to drift from it.

use std::path::Path;

/// A path's features and its `supported_by` (detection against a CPU that
/// has exactly the features a predicate accepts).
type PathCheck = (
    &'static str,
    &'static [&'static str],
    fn(&dyn Fn(&str) -> bool) -> bool,
);

fn paths() -> Vec<PathCheck> {
    #[allow(unused_mut)]
    let mut out: Vec<PathCheck> = Vec::new();
    #[cfg(target_arch = "x86_64")]
    {
        use oxoptim_core::simd::x86::{Avx2, Avx512, Avx512Vbmi};
        out.push(("avx2", Avx2::FEATURES, |has| Avx2::supported_by(has)));
        out.push(("avx512", Avx512::FEATURES, |has| Avx512::supported_by(has)));
        out.push(("avx512vbmi", Avx512Vbmi::FEATURES, |has| {
            Avx512Vbmi::supported_by(has)
        }));
    }
    #[cfg(target_arch = "aarch64")]
    {
        use oxoptim_core::simd::neon::Neon;
        out.push(("neon", Neon::FEATURES, |has| Neon::supported_by(has)));
    }
    out
}

#[test]
fn detection_requires_every_feature_a_path_is_compiled_with() {
    for (name, features, supported_by) in paths() {
        assert!(
            supported_by(&|_| true),
            "{name}: refused on a CPU with every feature"
        );
        for missing in features {
            assert!(
                !supported_by(&|f| f != *missing),
                "{name} would run without {missing}, which its code is compiled with"
            );
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[test]
fn the_avx512_path_lists_what_its_glue_is_compiled_with() {
    use oxoptim_core::simd::x86::Avx512;
    for feature in ["avx512f", "avx2", "fma"] {
        assert!(Avx512::FEATURES.contains(&feature), "{feature} missing");
    }
}

#[cfg(target_arch = "x86_64")]
#[test]
fn the_vbmi_path_lists_the_byte_permutes_and_everything_of_avx512() {
    use oxoptim_core::simd::x86::{Avx512, Avx512Vbmi};
    // Byte permutes and multishift (VBMI), byte compares and 64-bit masks (BW).
    for feature in Avx512::FEATURES.iter().chain(&["avx512bw", "avx512vbmi"]) {
        assert!(Avx512Vbmi::FEATURES.contains(feature), "{feature} missing");
    }
}

fn rust_sources(dir: &Path, out: &mut Vec<(String, String)>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_sources(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push((
                path.display().to_string(),
                std::fs::read_to_string(&path).unwrap(),
            ));
        }
    }
}

#[test]
fn target_features_are_enabled_and_detected_only_by_the_one_macro() {
    let mut sources = Vec::new();
    rust_sources(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("src"),
        &mut sources,
    );
    assert!(sources.len() > 5, "source files not found");
    // Built from pieces so that this file does not match itself.
    let rules = [
        (["#[target_feature(", "enable"].concat(), " = $feature)]"),
        (["_feature_detected", "!("].concat(), "$feature)"),
    ];
    for (path, text) in &sources {
        for (needle, allowed) in &rules {
            for (at, _) in text.match_indices(needle.as_str()) {
                assert!(
                    text[at + needle.len()..].starts_with(allowed),
                    "{path}: `{}` outside `cpu_path!`: derive it from the path's FEATURES",
                    &text[at..(at + 50).min(text.len())]
                );
            }
        }
    }
}

/// NEON is part of every aarch64 CPU: the NEON path must be found there (and so
/// is what `make test-aarch64` checks under qemu, not the scalar one).
#[cfg(target_arch = "aarch64")]
#[test]
fn neon_is_found_on_aarch64() {
    use oxoptim_core::Backend;
    assert!(Backend::supported().contains(&Backend::Neon));
}
