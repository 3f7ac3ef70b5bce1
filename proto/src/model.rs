//! The model's shape: presets, parameter and FLOP counts, and Hugging Face `config.json`.

use crate::job::ModelSpec;
use serde_json::{json, Value};

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ConfigError {
    #[error("unknown model preset {0:?}: expected one of tiny, 125m, 1b, 8b, 70b, 405b")]
    UnknownPreset(String),
    #[error("model shape: {0}")]
    Shape(String),
    #[error("the model section names no preset and no {0}; give a preset or every shape field")]
    MissingField(&'static str),
    #[error("Hugging Face config: {field}: {message}")]
    Unsupported { field: String, message: String },
}

/// Llama 3.1 rotary frequency scaling ("rope_type": "llama3").
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RopeScaling {
    pub factor: f64,
    pub low_freq_factor: f64,
    pub high_freq_factor: f64,
    pub original_max_position_embeddings: i64,
}

/// The shape of a Llama 3 model.
#[derive(Debug, Clone, PartialEq)]
pub struct LlamaConfig {
    pub vocab_size: i64,
    pub dim: i64,
    pub n_layers: i64,
    pub n_heads: i64,
    pub n_kv_heads: i64,
    pub head_dim: i64,
    pub ffn_dim: i64,
    pub norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: Option<RopeScaling>,
    pub max_seq_len: i64,
    pub tie_embeddings: bool,
}

const LLAMA31_SCALING: RopeScaling = RopeScaling {
    factor: 8.0,
    low_freq_factor: 1.0,
    high_freq_factor: 4.0,
    original_max_position_embeddings: 8192,
};

impl LlamaConfig {
    /// A named preset. `1b` is Llama 3.2 1B; `8b`, `70b` and `405b` are Llama 3.1.
    pub fn preset(name: &str) -> Result<Self, ConfigError> {
        let llama3 = |dim, n_layers, n_heads, ffn_dim, tie, scaling| LlamaConfig {
            vocab_size: 128_256,
            dim,
            n_layers,
            n_heads,
            n_kv_heads: 8,
            head_dim: dim / n_heads,
            ffn_dim,
            norm_eps: 1e-5,
            rope_theta: 500_000.0,
            rope_scaling: Some(scaling),
            max_seq_len: 131_072,
            tie_embeddings: tie,
        };
        let small = |dim, n_layers, n_heads, n_kv_heads, ffn_dim, max_seq_len| LlamaConfig {
            vocab_size: 50_257,
            dim,
            n_layers,
            n_heads,
            n_kv_heads,
            head_dim: dim / n_heads,
            ffn_dim,
            norm_eps: 1e-5,
            rope_theta: 10_000.0,
            rope_scaling: None,
            max_seq_len,
            tie_embeddings: true,
        };
        Ok(match name {
            "tiny" => small(64, 2, 4, 2, 192, 1024),
            "125m" => small(768, 12, 12, 12, 2048, 2048),
            "1b" => llama3(
                2048,
                16,
                32,
                8192,
                true,
                RopeScaling {
                    factor: 32.0,
                    ..LLAMA31_SCALING
                },
            ),
            "8b" => llama3(4096, 32, 32, 14_336, false, LLAMA31_SCALING),
            "70b" => llama3(8192, 80, 64, 28_672, false, LLAMA31_SCALING),
            "405b" => llama3(16_384, 126, 128, 53_248, false, LLAMA31_SCALING),
            other => return Err(ConfigError::UnknownPreset(other.to_owned())),
        })
    }

    /// The shape a job file asks for: its preset with the fields it names replaced, or a
    /// fully explicit shape.
    pub fn from_spec(spec: &ModelSpec) -> Result<Self, ConfigError> {
        let mut c = match spec.preset.as_deref() {
            Some(p) => Self::preset(p)?,
            None => {
                let need = |v: Option<i64>, name| v.ok_or(ConfigError::MissingField(name));
                let dim = need(spec.dim, "dim")?;
                let n_heads = need(spec.n_heads, "n_heads")?;
                LlamaConfig {
                    vocab_size: need(spec.vocab_size, "vocab_size")?,
                    dim,
                    n_layers: need(spec.n_layers, "n_layers")?,
                    n_heads,
                    n_kv_heads: spec.n_kv_heads.unwrap_or(n_heads),
                    head_dim: spec.head_dim.unwrap_or(dim / n_heads.max(1)),
                    ffn_dim: need(spec.ffn_dim, "ffn_dim")?,
                    norm_eps: 1e-5,
                    rope_theta: 10_000.0,
                    rope_scaling: None,
                    max_seq_len: 2048,
                    tie_embeddings: true,
                }
            }
        };
        if let Some(v) = spec.vocab_size {
            c.vocab_size = v;
        }
        if let Some(v) = spec.dim {
            c.dim = v;
            if spec.head_dim.is_none() {
                c.head_dim = v / spec.n_heads.unwrap_or(c.n_heads).max(1);
            }
        }
        if let Some(v) = spec.n_layers {
            c.n_layers = v;
        }
        if let Some(v) = spec.n_heads {
            c.n_heads = v;
            if spec.head_dim.is_none() {
                c.head_dim = c.dim / v.max(1);
            }
            if spec.n_kv_heads.is_none() && c.n_kv_heads > v {
                c.n_kv_heads = v;
            }
        }
        if let Some(v) = spec.n_kv_heads {
            c.n_kv_heads = v;
        }
        if let Some(v) = spec.head_dim {
            c.head_dim = v;
        }
        if let Some(v) = spec.ffn_dim {
            c.ffn_dim = v;
        }
        if let Some(v) = spec.norm_eps {
            c.norm_eps = v;
        }
        if let Some(v) = spec.rope_theta {
            c.rope_theta = v;
        }
        if let Some(v) = spec.max_seq_len {
            c.max_seq_len = v;
        }
        if let Some(v) = spec.tie_embeddings {
            c.tie_embeddings = v;
        }
        c.validate()?;
        Ok(c)
    }

    /// Refuses a tensor-parallel degree `tp` that does not split the heads, the FFN and the
    /// vocabulary evenly.
    pub fn check_tensor_parallel(&self, tp: usize) -> Result<(), ConfigError> {
        let (c, n) = (self, tp as i64);
        if c.n_heads % n != 0 || c.n_kv_heads % n != 0 || c.ffn_dim % n != 0 {
            return Err(ConfigError::Shape(format!(
                "parallel.tp = {n} must divide n_heads ({}), n_kv_heads ({}) and ffn_dim ({})",
                c.n_heads, c.n_kv_heads, c.ffn_dim
            )));
        }
        if c.vocab_size < n {
            return Err(ConfigError::Shape(format!(
                "parallel.tp = {n} exceeds vocab_size {}",
                c.vocab_size
            )));
        }
        Ok(())
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let positive = [
            ("vocab_size", self.vocab_size),
            ("dim", self.dim),
            ("n_layers", self.n_layers),
            ("n_heads", self.n_heads),
            ("n_kv_heads", self.n_kv_heads),
            ("head_dim", self.head_dim),
            ("ffn_dim", self.ffn_dim),
            ("max_seq_len", self.max_seq_len),
        ];
        for (name, v) in positive {
            if v < 1 {
                return Err(ConfigError::Shape(format!(
                    "{name} must be positive, got {v}"
                )));
            }
        }
        if self.n_heads % self.n_kv_heads != 0 {
            return Err(ConfigError::Shape(format!(
                "n_heads ({}) must be a multiple of n_kv_heads ({})",
                self.n_heads, self.n_kv_heads
            )));
        }
        if self.head_dim % 2 != 0 {
            return Err(ConfigError::Shape(format!(
                "head_dim must be even for rotary embeddings, got {}",
                self.head_dim
            )));
        }
        if self.norm_eps.is_nan()
            || self.norm_eps <= 0.0
            || self.rope_theta.is_nan()
            || self.rope_theta <= 0.0
        {
            return Err(ConfigError::Shape(
                "norm_eps and rope_theta must be positive".into(),
            ));
        }
        Ok(())
    }

    /// Parameters of one transformer block.
    pub fn block_params(&self) -> i64 {
        let (d, hd) = (self.dim, self.head_dim);
        let attn = d * self.n_heads * hd * 2 + d * self.n_kv_heads * hd * 2;
        attn + 3 * d * self.ffn_dim + 2 * d
    }

    /// Exact number of parameters (a tied head counted once).
    pub fn num_params(&self) -> i64 {
        let embed = self.vocab_size * self.dim;
        let head = if self.tie_embeddings { 0 } else { embed };
        embed + self.n_layers * self.block_params() + self.dim + head
    }

    /// Training FLOPs per token at sequence length `seq_len`, counted as PaLM (appendix B)
    /// and TorchTitan do: `6 * N + 12 * n_layers * n_heads * head_dim * seq_len`, where N is
    /// every parameter except an untied input embedding table (a lookup, not a matmul; a
    /// tied table is the output head and counts). The attention term counts the full score
    /// matrix, not half of it for the causal mask.
    pub fn flops_per_token(&self, seq_len: i64) -> f64 {
        let lookup_only = if self.tie_embeddings {
            0
        } else {
            self.vocab_size * self.dim
        };
        6.0 * (self.num_params() - lookup_only) as f64
            + 12.0 * (self.n_layers * self.n_heads * self.head_dim * seq_len) as f64
    }

    /// A `config.json` that Hugging Face transformers loads as `LlamaForCausalLM`.
    pub fn to_hf_json(&self, eos_id: Option<u32>) -> Value {
        let scaling = self.rope_scaling.map(|s| {
            json!({
                "rope_type": "llama3",
                "factor": s.factor,
                "low_freq_factor": s.low_freq_factor,
                "high_freq_factor": s.high_freq_factor,
                "original_max_position_embeddings": s.original_max_position_embeddings,
            })
        });
        json!({
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_act": "silu",
            "attention_bias": false,
            "attention_dropout": 0.0,
            "mlp_bias": false,
            "hidden_size": self.dim,
            "intermediate_size": self.ffn_dim,
            "num_hidden_layers": self.n_layers,
            "num_attention_heads": self.n_heads,
            "num_key_value_heads": self.n_kv_heads,
            "head_dim": self.head_dim,
            "vocab_size": self.vocab_size,
            "max_position_embeddings": self.max_seq_len,
            "rms_norm_eps": self.norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": scaling,
            "tie_word_embeddings": self.tie_embeddings,
            "initializer_range": 0.02,
            "eos_token_id": eos_id,
            "torch_dtype": "float32",
        })
    }

    /// Reads a Hugging Face Llama `config.json`, refusing (and naming) any field whose value
    /// Kiln's model cannot represent.
    pub fn from_hf_json(v: &Value) -> Result<Self, ConfigError> {
        let unsupported = |field: &str, message: String| ConfigError::Unsupported {
            field: field.to_owned(),
            message,
        };
        let int = |field: &str| -> Result<Option<i64>, ConfigError> {
            match v.get(field) {
                None | Some(Value::Null) => Ok(None),
                Some(x) => x
                    .as_i64()
                    .map(Some)
                    .ok_or_else(|| unsupported(field, format!("expected an integer, got {x}"))),
            }
        };
        let float = |obj: &Value, field: &str| -> Result<Option<f64>, ConfigError> {
            match obj.get(field) {
                None | Some(Value::Null) => Ok(None),
                Some(x) => x
                    .as_f64()
                    .map(Some)
                    .ok_or_else(|| unsupported(field, format!("expected a number, got {x}"))),
            }
        };
        let need = |field: &str| {
            int(field)?.ok_or_else(|| unsupported(field, "missing; Kiln needs it".into()))
        };
        if let Some(t) = v.get("model_type").and_then(Value::as_str) {
            if t != "llama" {
                return Err(unsupported(
                    "model_type",
                    format!("{t:?} is not supported; Kiln loads Llama models only"),
                ));
            }
        }
        for (field, want) in [("hidden_act", "silu"), ("hidden_activation", "silu")] {
            if let Some(act) = v.get(field).and_then(Value::as_str) {
                if act != want {
                    return Err(unsupported(
                        field,
                        format!("{act:?} is not supported; Kiln's MLP is SwiGLU ({want:?})"),
                    ));
                }
            }
        }
        for field in ["attention_bias", "mlp_bias"] {
            if v.get(field).and_then(Value::as_bool) == Some(true) {
                return Err(unsupported(
                    field,
                    "true is not supported; Kiln's projections have no bias".into(),
                ));
            }
        }
        if float(v, "attention_dropout")?.is_some_and(|p| p != 0.0) {
            return Err(unsupported(
                "attention_dropout",
                "non-zero dropout is not supported".into(),
            ));
        }
        let dim = need("hidden_size")?;
        let n_heads = need("num_attention_heads")?;
        // transformers 5 writes `rope_parameters`; earlier versions `rope_theta` + `rope_scaling`.
        let (rope_field, rope) = match (v.get("rope_parameters"), v.get("rope_scaling")) {
            (Some(p), _) if !p.is_null() => ("rope_parameters", Some(p)),
            (_, Some(s)) if !s.is_null() => ("rope_scaling", Some(s)),
            _ => ("rope_scaling", None),
        };
        let mut rope_theta = float(v, "rope_theta")?.unwrap_or(10_000.0);
        let mut rope_scaling = None;
        if let Some(r) = rope {
            if let Some(theta) = float(r, "rope_theta")? {
                rope_theta = theta;
            }
            let kind = r
                .get("rope_type")
                .or_else(|| r.get("type"))
                .and_then(Value::as_str)
                .unwrap_or("default");
            match kind {
                "default" => {}
                "llama3" => {
                    let f = |name: &str| -> Result<f64, ConfigError> {
                        float(r, name)?.ok_or_else(|| {
                            unsupported(
                                &format!("{rope_field}.{name}"),
                                "missing for llama3 scaling".into(),
                            )
                        })
                    };
                    rope_scaling = Some(RopeScaling {
                        factor: f("factor")?,
                        low_freq_factor: f("low_freq_factor")?,
                        high_freq_factor: f("high_freq_factor")?,
                        original_max_position_embeddings: f("original_max_position_embeddings")?
                            as i64,
                    });
                }
                other => {
                    return Err(unsupported(
                        &format!("{rope_field}.rope_type"),
                        format!("{other:?} is not supported; Kiln implements default and llama3"),
                    ))
                }
            }
        }
        let c = LlamaConfig {
            vocab_size: need("vocab_size")?,
            dim,
            n_layers: need("num_hidden_layers")?,
            n_heads,
            n_kv_heads: int("num_key_value_heads")?.unwrap_or(n_heads),
            head_dim: int("head_dim")?.unwrap_or(dim / n_heads.max(1)),
            ffn_dim: need("intermediate_size")?,
            norm_eps: float(v, "rms_norm_eps")?.unwrap_or(1e-6),
            rope_theta,
            rope_scaling,
            max_seq_len: int("max_position_embeddings")?.unwrap_or(2048),
            tie_embeddings: v
                .get("tie_word_embeddings")
                .and_then(Value::as_bool)
                .unwrap_or(false),
        };
        c.validate()
            .map_err(|e| unsupported("shape", e.to_string()))?;
        Ok(c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_have_the_published_parameter_counts() {
        // Meta's published totals for Llama 3.2 1B and Llama 3.1 8B / 70B / 405B.
        let count = |p| LlamaConfig::preset(p).unwrap().num_params();
        assert_eq!(count("1b"), 1_235_814_400);
        assert_eq!(count("8b"), 8_030_261_248);
        assert_eq!(count("70b"), 70_553_706_496);
        assert_eq!(count("405b"), 405_853_388_800);
        assert_eq!(count("125m"), 123_551_232);
    }

    #[test]
    fn flops_follow_the_palm_formula() {
        let c = LlamaConfig::preset("8b").unwrap();
        let n: i64 = 8_030_261_248 - 128_256 * 4096; // the untied input embedding excluded
        let expected = 6.0 * n as f64 + 12.0 * (32 * 32 * 128 * 8192) as f64;
        assert_eq!(c.flops_per_token(8192), expected);
        // Tied: the one table is the output head and counts.
        let c = LlamaConfig::preset("1b").unwrap();
        let expected = 6.0 * 1_235_814_400f64 + 12.0 * (16 * 32 * 64 * 4096) as f64;
        assert_eq!(c.flops_per_token(4096), expected);
    }

    #[test]
    fn spec_overrides_a_preset() {
        let spec = ModelSpec {
            preset: Some("tiny".into()),
            dim: Some(128),
            vocab_size: Some(1000),
            ..Default::default()
        };
        let c = LlamaConfig::from_spec(&spec).unwrap();
        assert_eq!((c.dim, c.head_dim, c.vocab_size), (128, 32, 1000));
        let bad = ModelSpec {
            preset: Some("tiny".into()),
            n_kv_heads: Some(3),
            ..Default::default()
        };
        assert_eq!(
            LlamaConfig::from_spec(&bad).unwrap_err().to_string(),
            "model shape: n_heads (4) must be a multiple of n_kv_heads (3)"
        );
    }

    #[test]
    fn hf_json_round_trips_and_names_unsupported_fields() {
        for p in ["tiny", "1b", "8b"] {
            let c = LlamaConfig::preset(p).unwrap();
            assert_eq!(LlamaConfig::from_hf_json(&c.to_hf_json(None)).unwrap(), c);
        }
        let mut v = LlamaConfig::preset("tiny").unwrap().to_hf_json(None);
        v["rope_scaling"] = json!({"rope_type": "yarn", "factor": 4.0});
        assert_eq!(
            LlamaConfig::from_hf_json(&v).unwrap_err().to_string(),
            "Hugging Face config: rope_scaling.rope_type: \"yarn\" is not supported; Kiln implements default and llama3"
        );
        let mut v = LlamaConfig::preset("tiny").unwrap().to_hf_json(None);
        v["mlp_bias"] = json!(true);
        assert!(LlamaConfig::from_hf_json(&v)
            .unwrap_err()
            .to_string()
            .starts_with("Hugging Face config: mlp_bias: true is not supported"));
    }
}
