//! One renderer per format, all fed the engine's answers and the schema's types: the live
//! human lines and the summary ([`human`]), the hot failure stream ([`line`]), `top`'s screen
//! ([`top`]), `doctor` ([`doctor`]), `report` as text and HTML ([`report_text`], [`html`]),
//! Prometheus ([`prometheus`], served by [`http`]); and [`stdout`], the one way results reach
//! stdout (a closed pipe ends them quietly). Pure except [`http`], [`stdout`] and the terminal of
//! [`top`]. Machine output needs no renderer here: it is the schema's own lines.
pub mod doctor;
pub mod html;
pub mod http;
pub mod human;
pub mod line;
pub mod nat;
pub mod prometheus;
pub mod report_text;
pub mod stdout;
pub mod text;
pub mod top;
