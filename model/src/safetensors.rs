//! Reading and writing safetensors files, memory-mapped, with errors that name the file and
//! tensor.
//!
//! Format: 8-byte little-endian header length `n`, `n` bytes of JSON mapping each tensor name to
//! `{dtype, shape, data_offsets: [begin, end]}` (offsets relative to the end of the header), an
//! optional `__metadata__` map of strings, then the data. Every header entry is checked against
//! the file size and against its dtype × shape before any byte is handed out, so a truncated or
//! corrupt file is an error here, never a panic or garbage later.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use hal::DType;
use memmap2::Mmap;

use crate::error::LoadError;

/// One tensor's entry in a safetensors header.
#[derive(Clone, Debug)]
pub struct TensorInfo {
    pub dtype: DType,
    pub shape: Vec<usize>,
    /// Byte range inside the data section.
    pub begin: usize,
    pub end: usize,
}

/// An open, validated safetensors file.
pub struct SafeTensors {
    path: PathBuf,
    map: Mmap,
    data_start: usize,
    tensors: BTreeMap<String, TensorInfo>,
    metadata: BTreeMap<String, String>,
}

impl SafeTensors {
    /// Maps `path` and validates its header.
    pub fn open(path: &Path) -> Result<Self, LoadError> {
        let bad = |msg: String| LoadError::Corrupt { file: path.to_path_buf(), message: msg };
        let file = File::open(path).map_err(|e| LoadError::Io { file: path.to_path_buf(), err: e })?;
        // SAFETY: the file is opened read-only; a concurrent writer truncating it would be a
        // misuse of a checkpoint directory that the OS reports as SIGBUS, which we accept as for
        // every mmap-based loader.
        let map = unsafe { Mmap::map(&file) }.map_err(|e| LoadError::Io { file: path.to_path_buf(), err: e })?;
        if map.len() < 8 {
            return Err(bad(format!("file is {} bytes, shorter than the 8-byte header length", map.len())));
        }
        let n = u64::from_le_bytes(map[..8].try_into().expect("8 bytes")) as usize;
        if n > map.len() - 8 {
            return Err(bad(format!("header length {n} exceeds the file size {} (truncated?)", map.len())));
        }
        let header: serde_json::Value =
            serde_json::from_slice(&map[8..8 + n]).map_err(|e| bad(format!("header is not valid JSON: {e}")))?;
        let obj = header.as_object().ok_or_else(|| bad("header is not a JSON object".into()))?;
        let data_start = 8 + n;
        let data_len = map.len() - data_start;
        let mut tensors = BTreeMap::new();
        let mut metadata = BTreeMap::new();
        for (name, entry) in obj {
            if name == "__metadata__" {
                if let Some(m) = entry.as_object() {
                    for (k, v) in m {
                        metadata.insert(k.clone(), v.as_str().unwrap_or_default().to_string());
                    }
                }
                continue;
            }
            let info = parse_entry(entry).map_err(|m| bad(format!("tensor '{name}': {m}")))?;
            let want = info.shape.iter().product::<usize>() * info.dtype.size();
            if info.end < info.begin || info.end - info.begin != want {
                return Err(bad(format!(
                    "tensor '{name}': data_offsets [{}, {}] hold {} bytes but {} {:?} needs {want}",
                    info.begin,
                    info.end,
                    info.end.saturating_sub(info.begin),
                    info.dtype,
                    info.shape
                )));
            }
            if info.end > data_len {
                return Err(bad(format!(
                    "tensor '{name}': data ends at byte {} but the data section has only {data_len} bytes (truncated file)",
                    info.end
                )));
            }
            tensors.insert(name.clone(), info);
        }
        Ok(SafeTensors { path: path.to_path_buf(), map, data_start, tensors, metadata })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
    /// Tensor names, sorted.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(|s| s.as_str())
    }
    pub fn info(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.get(name)
    }
    pub fn metadata(&self) -> &BTreeMap<String, String> {
        &self.metadata
    }

    /// The raw little-endian bytes of `name`.
    pub fn bytes(&self, name: &str) -> Result<&[u8], LoadError> {
        let info = self.info(name).ok_or_else(|| self.missing(name))?;
        Ok(&self.map[self.data_start + info.begin..self.data_start + info.end])
    }

    /// `name` decoded to f32 (any float dtype; integers converted).
    pub fn f32(&self, name: &str) -> Result<Vec<f32>, LoadError> {
        let info = self.info(name).ok_or_else(|| self.missing(name))?;
        Ok(hal::dtype::decode_to_f32(info.dtype, self.bytes(name)?))
    }

    /// `name` as i64 values (I64, I32, I8 or U8 tensors).
    pub fn i64(&self, name: &str) -> Result<Vec<i64>, LoadError> {
        let info = self.info(name).ok_or_else(|| self.missing(name))?;
        let b = self.bytes(name)?;
        Ok(match info.dtype {
            DType::I64 => b.chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().expect("8"))).collect(),
            DType::I32 => b.chunks_exact(4).map(|c| i32::from_le_bytes(c.try_into().expect("4")) as i64).collect(),
            DType::I8 => b.iter().map(|&x| x as i8 as i64).collect(),
            DType::U8 => b.iter().map(|&x| x as i64).collect(),
            other => {
                return Err(LoadError::Tensor {
                    file: self.path.clone(),
                    tensor: name.into(),
                    message: format!("expected an integer dtype, found {other}"),
                })
            }
        })
    }

    fn missing(&self, name: &str) -> LoadError {
        LoadError::Tensor { file: self.path.clone(), tensor: name.into(), message: "not present in this file".into() }
    }
}

fn parse_entry(entry: &serde_json::Value) -> Result<TensorInfo, String> {
    let dtype_name = entry.get("dtype").and_then(|v| v.as_str()).ok_or("missing 'dtype'")?;
    let dtype = DType::from_safetensors_name(dtype_name).ok_or_else(|| format!("unsupported dtype '{dtype_name}'"))?;
    let shape = entry
        .get("shape")
        .and_then(|v| v.as_array())
        .ok_or("missing 'shape'")?
        .iter()
        .map(|d| d.as_u64().map(|x| x as usize).ok_or("shape entries must be non-negative integers"))
        .collect::<Result<Vec<_>, _>>()?;
    let offs = entry.get("data_offsets").and_then(|v| v.as_array()).ok_or("missing 'data_offsets'")?;
    if offs.len() != 2 {
        return Err("'data_offsets' must have two entries".into());
    }
    let begin = offs[0].as_u64().ok_or("bad data_offsets")? as usize;
    let end = offs[1].as_u64().ok_or("bad data_offsets")? as usize;
    Ok(TensorInfo { dtype, shape, begin, end })
}

/// A tensor to write: name, dtype, shape, little-endian bytes.
pub struct WriteTensor<'a> {
    pub name: &'a str,
    pub dtype: DType,
    pub shape: Vec<usize>,
    pub data: &'a [u8],
}

/// Writes a safetensors file (tensors sorted by name, 8-byte aligned header).
pub fn write(path: &Path, tensors: &[WriteTensor<'_>], metadata: &BTreeMap<String, String>) -> Result<(), LoadError> {
    let io = |e| LoadError::Io { file: path.to_path_buf(), err: e };
    let mut order: Vec<&WriteTensor> = tensors.iter().collect();
    order.sort_by(|a, b| a.name.cmp(b.name));
    let mut header = serde_json::Map::new();
    if !metadata.is_empty() {
        header.insert("__metadata__".into(), serde_json::to_value(metadata).expect("string map"));
    }
    let mut offset = 0usize;
    for t in &order {
        let want = t.shape.iter().product::<usize>() * t.dtype.size();
        if want != t.data.len() {
            return Err(LoadError::Tensor {
                file: path.to_path_buf(),
                tensor: t.name.into(),
                message: format!("{} bytes given for {} {:?} ({want} expected)", t.data.len(), t.dtype, t.shape),
            });
        }
        header.insert(
            t.name.to_string(),
            serde_json::json!({"dtype": t.dtype.safetensors_name(), "shape": t.shape, "data_offsets": [offset, offset + want]}),
        );
        offset += want;
    }
    let mut json = serde_json::to_vec(&serde_json::Value::Object(header)).expect("serializable");
    while !(8 + json.len()).is_multiple_of(8) {
        json.push(b' ');
    }
    let mut f = std::io::BufWriter::new(File::create(path).map_err(io)?);
    f.write_all(&(json.len() as u64).to_le_bytes()).map_err(io)?;
    f.write_all(&json).map_err(io)?;
    for t in &order {
        f.write_all(t.data).map_err(io)?;
    }
    f.flush().map_err(io)
}
