pub use power_retention_schema as schema;
