//! ABI check of `v4rt_ascend::sys` against the real ACL and HCCL headers.
//!
//! The headers come from the torch-npu wheel (never vendored here; see README.md for the exact
//! download commands). Point `V4RT_TORCH_NPU_HEADERS` at the unpacked wheel (any of: the wheel
//! root, `torch_npu/include`, or `torch_npu/include/third_party`). Built without it the test is
//! marked ignored (`build.rs`), so it is reported as not run rather than passed; with it, a
//! missing libclang or header is a failure.
//!
//! At test time bindgen turns `acl/acl.h`, `acl/error_codes/rt_error_codes.h`, `hccl/hccl.h`
//! and `hccl/hccl_types.h` into Rust, which is parsed with syn. Then, for every symbol of the
//! ACL and HCCL tables in `sys`, the parameter and return types are compared after resolving
//! typedefs on both sides (bindgen's `pub type` items; our `ABI_TYPES`) and mapping the
//! `c_int`-style names to fixed-width ones; every constant in `ABI_CONSTANTS` is compared by
//! value; every typedef in `ABI_TYPES` is compared by what it resolves to.
//!
//! Not checkable this way: the nnopbase/aclnn prototypes (`acl_meta.h`, `aclnnop/*.h` are not
//! in the wheel); they come from the op docs.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

use v4rt_ascend::sys::{self, AclFns, AclOptFns, FnSignature, HcclFns};

const ENV: &str = "V4RT_TORCH_NPU_HEADERS";

/// Include directories for the headers under the directory the env var names: `acl/inc`,
/// `hccl/inc`, and the directory above `third_party/` (hccl.h includes
/// "third_party/hccl/inc/hccl/hccl_types.h").
fn locate(dir: &Path) -> Option<Vec<PathBuf>> {
    let prefixes = ["", "third_party", "include/third_party", "torch_npu/include/third_party"];
    prefixes.iter().map(|p| dir.join(p)).find_map(|base| {
        let (acl, hccl) = (base.join("acl/inc"), base.join("hccl/inc"));
        let found = acl.join("acl/acl.h").exists() && hccl.join("hccl/hccl.h").exists();
        let above = base.parent().map(Path::to_path_buf).unwrap_or_else(|| base.clone());
        found.then(|| vec![acl, hccl, above])
    })
}

/// What the generated bindings declare.
#[derive(Default)]
struct Decls {
    fns: HashMap<String, (Vec<syn::Type>, Option<syn::Type>)>,
    aliases: HashMap<String, syn::Type>,
    structs: HashSet<String>,
    consts: HashMap<String, i64>,
    struct_fields: HashMap<String, Vec<syn::Type>>,
}

fn int_value(e: &syn::Expr) -> Option<i64> {
    match e {
        syn::Expr::Lit(syn::ExprLit { lit: syn::Lit::Int(i), .. }) => i.base10_parse::<i64>().ok(),
        syn::Expr::Unary(syn::ExprUnary { op: syn::UnOp::Neg(_), expr, .. }) => int_value(expr).map(|v| -v),
        syn::Expr::Paren(p) => int_value(&p.expr),
        syn::Expr::Cast(c) => int_value(&c.expr),
        _ => None,
    }
}

fn collect(text: &str) -> Decls {
    let file = syn::parse_file(text).expect("bindgen output parses");
    let mut d = Decls::default();
    for item in file.items {
        match item {
            syn::Item::ForeignMod(m) => {
                for fi in m.items {
                    if let syn::ForeignItem::Fn(f) = fi {
                        let params = f
                            .sig
                            .inputs
                            .iter()
                            .filter_map(|a| match a {
                                syn::FnArg::Typed(t) => Some((*t.ty).clone()),
                                syn::FnArg::Receiver(_) => None,
                            })
                            .collect();
                        let ret = match f.sig.output {
                            syn::ReturnType::Default => None,
                            syn::ReturnType::Type(_, t) => Some(*t),
                        };
                        d.fns.insert(f.sig.ident.to_string(), (params, ret));
                    }
                }
            }
            syn::Item::Type(t) => {
                d.aliases.insert(t.ident.to_string(), *t.ty);
            }
            syn::Item::Struct(s) => {
                d.struct_fields.insert(s.ident.to_string(), s.fields.iter().map(|f| f.ty.clone()).collect());
                d.structs.insert(s.ident.to_string());
            }
            syn::Item::Const(c) => {
                if let Some(v) = int_value(&c.expr) {
                    d.consts.insert(c.ident.to_string(), v);
                }
            }
            _ => {}
        }
    }
    d
}

/// A platform-independent spelling of a type: typedefs resolved (but a typedef of a struct is
/// kept by its typedef name, the name C code uses), `c_int`-style names mapped to fixed widths
/// (`c_char` kept: its signedness is per platform on both sides alike).
fn canon(ty: &syn::Type, aliases: &HashMap<String, syn::Type>, structs: &HashSet<String>) -> String {
    match ty {
        syn::Type::Ptr(p) => {
            format!("*{} {}", if p.mutability.is_some() { "mut" } else { "const" }, canon(&p.elem, aliases, structs))
        }
        syn::Type::Paren(p) => canon(&p.elem, aliases, structs),
        syn::Type::Tuple(t) if t.elems.is_empty() => "()".into(),
        syn::Type::Array(a) => {
            let n = int_value(&a.len).map_or_else(|| "?".to_string(), |v| v.to_string());
            format!("[{}; {n}]", canon(&a.elem, aliases, structs))
        }
        syn::Type::Path(p) => {
            let name = p.path.segments.last().map(|s| s.ident.to_string()).unwrap_or_default();
            let fixed = match name.as_str() {
                "c_int" => "i32",
                "c_uint" => "u32",
                "c_short" => "i16",
                "c_ushort" => "u16",
                "c_long" | "c_longlong" => "i64",
                "c_ulong" | "c_ulonglong" => "u64",
                "c_schar" => "i8",
                "c_uchar" => "u8",
                "c_float" => "f32",
                "c_double" => "f64",
                "size_t" => "usize",
                _ => "",
            };
            if !fixed.is_empty() {
                return fixed.into();
            }
            match aliases.get(&name) {
                Some(syn::Type::Path(target))
                    if target.path.segments.last().is_some_and(|s| structs.contains(&s.ident.to_string())) =>
                {
                    name
                }
                Some(target) => canon(target, aliases, structs),
                None => name,
            }
        }
        other => format!("<unsupported type {}>", std::any::type_name_of_val(other)),
    }
}

fn parse_ty(s: &str) -> syn::Type {
    syn::parse_str(s).unwrap_or_else(|e| panic!("our type '{s}' does not parse: {e}"))
}

/// Our typedefs, as syn types.
fn our_aliases() -> HashMap<String, syn::Type> {
    sys::ABI_TYPES.iter().map(|(n, t)| (n.to_string(), parse_ty(t))).collect()
}

/// Compares our prototypes with the headers'; returns one line per mismatch.
fn compare_fns(ours: &[FnSignature], theirs: &Decls, required: bool) -> (Vec<String>, usize) {
    let (oa, no_structs) = (our_aliases(), HashSet::new());
    let mut problems = Vec::new();
    let mut checked = 0;
    for sig in ours {
        let Some((params, ret)) = theirs.fns.get(sig.symbol) else {
            if required {
                problems.push(format!("{}: not declared in the headers", sig.symbol));
            } else {
                println!("note: {} is not declared in these headers (optional symbol)", sig.symbol);
            }
            continue;
        };
        checked += 1;
        let mine: Vec<String> = sig.params.iter().map(|p| canon(&parse_ty(p), &oa, &no_structs)).collect();
        let hdr: Vec<String> = params.iter().map(|p| canon(p, &theirs.aliases, &theirs.structs)).collect();
        let my_ret = if sig.ret.is_empty() { "()".to_string() } else { canon(&parse_ty(sig.ret), &oa, &no_structs) };
        let hdr_ret = ret.as_ref().map_or_else(|| "()".to_string(), |t| canon(t, &theirs.aliases, &theirs.structs));
        if mine != hdr || my_ret != hdr_ret {
            problems.push(format!(
                "{}: ours fn({}) -> {my_ret}, header fn({}) -> {hdr_ret}",
                sig.symbol,
                mine.join(", "),
                hdr.join(", ")
            ));
        }
    }
    (problems, checked)
}

fn bindgen_for(header_text: &str, clang_args: &[String]) -> String {
    bindgen::Builder::default()
        .header_contents("v4rt_abi_check.h", header_text)
        .clang_args(clang_args)
        .prepend_enum_name(false)
        .default_enum_style(bindgen::EnumVariation::Consts)
        .layout_tests(false)
        .generate_comments(false)
        .allowlist_function("acl.*|Hccl.*|v4rt.*")
        .allowlist_type("acl.*|Hccl.*")
        .allowlist_var("ACL_.*|HCCL_.*")
        .generate()
        .unwrap_or_else(|e| panic!("bindgen failed: {e}"))
        .to_string()
}

#[test]
#[cfg_attr(
    not(v4rt_npu_headers),
    ignore = "needs the torch-npu headers: build and run with V4RT_TORCH_NPU_HEADERS set (.ci/run does; see ascend/README.md, \"ABI check\")"
)]
fn sys_matches_torch_npu_headers() {
    let Some(dir) = std::env::var_os(ENV) else {
        panic!("{ENV} is not set: see ascend/README.md (\"ABI check\") for the pip download / unzip / env commands");
    };
    let dir = PathBuf::from(dir);
    let includes = locate(&dir).unwrap_or_else(|| {
        panic!("{ENV}={} does not contain acl/inc/acl/acl.h and hccl/inc/hccl/hccl.h (tried the wheel root, torch_npu/include, .../third_party)", dir.display())
    });
    let mut args: Vec<String> = vec!["-x".into(), "c++".into(), "-std=c++14".into()];
    args.extend(includes.iter().map(|p| format!("-I{}", p.display())));

    // Self-check first: the comparison must notice a wrong prototype.
    let fake = bindgen_for("extern \"C\" { int v4rtProbe(void* p, unsigned long n); }", &args[..3]);
    let d = collect(&fake);
    let wrong = [FnSignature { symbol: "v4rtProbe", params: &["*mut c_void", "u32"], ret: "i32" }];
    let right = [FnSignature { symbol: "v4rtProbe", params: &["*mut c_void", "u64"], ret: "i32" }];
    assert_eq!(compare_fns(&wrong, &d, true).0.len(), 1, "the checker must flag a wrong width");
    assert!(compare_fns(&right, &d, true).0.is_empty(), "{:?}", compare_fns(&right, &d, true).0);

    let header = "#include \"acl/acl.h\"\n#include \"acl/error_codes/rt_error_codes.h\"\n#include \"hccl/hccl.h\"\n#include \"hccl/hccl_types.h\"\n";
    let text = bindgen_for(header, &args);
    let d = collect(&text);
    println!(
        "bindgen: {} functions, {} typedefs, {} constants from {}",
        d.fns.len(),
        d.aliases.len(),
        d.consts.len(),
        includes[0].display()
    );

    let mut problems = Vec::new();
    let mut checked = 0;
    for (table, required) in [(AclFns::SIGNATURES, true), (AclOptFns::SIGNATURES, false), (HcclFns::SIGNATURES, true)] {
        let (p, n) = compare_fns(table, &d, required);
        problems.extend(p);
        checked += n;
    }

    let no_structs = HashSet::new();
    let oa = our_aliases();
    for (name, ty) in sys::ABI_TYPES {
        match d.aliases.get(*name) {
            None => problems.push(format!("typedef {name}: not in the headers")),
            Some(_) => {
                let hdr = canon(&parse_ty(name), &d.aliases, &d.structs);
                let mine = canon(&parse_ty(ty), &oa, &no_structs);
                if hdr != mine {
                    problems.push(format!("typedef {name}: ours {mine}, header {hdr}"));
                }
            }
        }
    }

    for (name, value) in sys::ABI_CONSTANTS {
        match d.consts.get(*name) {
            None => problems.push(format!("constant {name}: not in the headers")),
            Some(v) if v != value => problems.push(format!("constant {name}: ours {value}, header {v}")),
            Some(_) => {}
        }
    }

    // HcclRootInfo: one char array of HCCL_ROOT_INFO_BYTES.
    let root = canon(&parse_ty("HcclRootInfo"), &d.aliases, &HashSet::new());
    let fields = d.struct_fields.get(&root).cloned().unwrap_or_default();
    let field_text: Vec<String> = fields.iter().map(|t| canon(t, &d.aliases, &d.structs)).collect();
    let want = format!("[c_char; {}]", sys::HCCL_ROOT_INFO_BYTES);
    if field_text != [want.clone()] {
        problems.push(format!("HcclRootInfo ({root}): header fields {field_text:?}, ours [{want}]"));
    }
    assert_eq!(std::mem::size_of::<sys::HcclRootInfo>(), sys::HCCL_ROOT_INFO_BYTES);

    println!(
        "checked {checked} prototypes, {} typedefs, {} constants against {}",
        sys::ABI_TYPES.len(),
        sys::ABI_CONSTANTS.len(),
        dir.display()
    );
    assert!(problems.is_empty(), "ABI mismatches against the headers:\n  {}", problems.join("\n  "));
}
