#![doc = include_str!("../README.md")]
#![deny(missing_docs)]
#![forbid(unsafe_op_in_unsafe_fn)]

pub mod cast;
mod convert;
pub mod dtype;
mod error;
pub mod format;
pub mod model;
pub mod plan;
pub mod read;
pub mod source;
pub mod write;

pub use convert::{
    convert, convert_with, plan_conversion, ConversionPlan, ConversionReport, ConvertConfig,
    ConvertConfigBuilder, Event, Observer, PlannedEntry, Silent, DEFAULT_INFLIGHT_PER_THREAD,
    DEFAULT_MAX_ROW_MB, DEFAULT_ROW_GROUP_MB, DEFAULT_ZSTD_LEVEL, TOKENIZER_FILES,
};
pub use dtype::{Dtype, TargetDtype};
pub use error::{sanitize, Error, Result};
pub use model::{Filters, ModelType, Part};
pub use read::{export, verify, ExportOptions, Tensor, VerifyOptions, VerifyReport, WeightFile};
pub use write::atomic::remove_temp_files;
pub use write::Codec;
