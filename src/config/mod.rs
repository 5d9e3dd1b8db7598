//! Configuration: the training run (`run`, TOML files in configs/) and the model's `config.json` (`model`).

pub mod model;
pub mod run;

pub use model::ModelConfig;
pub use run::RunConfig;
