//! SliceGPT's dimensions: which stream points share a basis, and the width k at each point
//! (docs/design.md §3).
use crate::structure::Layout;

/// Which stream points share one basis. Between points of one basis the skip stays a plain Add;
/// between two bases it gets a `k_a × k_b` shortcut MatMul.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BasisMode {
    /// One basis per stream point (the paper): a shortcut on every skip. The library's default;
    /// the command line's is [`BasisMode::Global`], which measured best per byte (bench/README.md).
    #[default]
    Point,
    /// A block's input and its middle point (after attention) share one basis: one shortcut per
    /// sequential block, on the MLP's skip. A parallel block (Phi, GPT-NeoX) has no middle point,
    /// so there `block` is `point`.
    Block,
    /// One basis for the whole stream, from one calibration pass over the unsliced model: no
    /// shortcut, except into the head's input where it keeps the full width D.
    Global,
}

impl std::fmt::Display for BasisMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            BasisMode::Point => "point",
            BasisMode::Block => "block",
            BasisMode::Global => "global",
        })
    }
}

impl std::str::FromStr for BasisMode {
    type Err = String;

    fn from_str(text: &str) -> std::result::Result<Self, String> {
        match text.trim().to_ascii_lowercase().as_str() {
            "point" => Ok(BasisMode::Point),
            "block" => Ok(BasisMode::Block),
            "global" => Ok(BasisMode::Global),
            _ => Err(format!("expected point, block or global, got '{text}'")),
        }
    }
}

#[derive(Debug, Clone, Copy)]
pub struct Dimensions {
    /// Fraction of the stream width to remove.
    pub ratio: f64,
    /// The sliced width itself, instead of the one `ratio` gives (a size budget's solution).
    pub width: Option<usize>,
    /// Sliced widths are rounded down to a multiple of this.
    pub round_to: usize,
    /// Slice the last stream point too (changes the head's input width).
    pub slice_head: bool,
    pub basis: BasisMode,
}

impl Default for Dimensions {
    fn default() -> Self {
        Dimensions {
            ratio: 0.0,
            width: None,
            round_to: 8,
            slice_head: false,
            basis: BasisMode::default(),
        }
    }
}

impl Dimensions {
    /// `k = floor((1 − r)·D)` rounded down to a multiple of `round_to` (at least `round_to`, at
    /// most D); or the given `width`, at most D.
    pub fn sliced_width(&self, width: usize) -> usize {
        if let Some(k) = self.width {
            return k.min(width);
        }
        let k = ((1.0 - self.ratio) * width as f64).floor() as usize;
        let round = self.round_to.max(1);
        if k >= width {
            return width;
        }
        ((k / round) * round).clamp(round.min(width), width)
    }

    /// The width at every stream point of a layout.
    pub fn widths(&self, layout: &Layout) -> Vec<usize> {
        let points = layout.stream_points().len();
        (0..points)
            .map(|p| {
                if p + 1 == points && !self.slice_head {
                    layout.width
                } else {
                    self.sliced_width(layout.width)
                }
            })
            .collect()
    }

    /// The basis group of every stream point (see [`basis_groups`]).
    pub fn groups(&self, layout: &Layout) -> Vec<usize> {
        basis_groups(layout, self.basis, &self.widths(layout))
    }
}

/// `groups[p]` = the first point of the basis point p shares. A point joins the one before it when
/// the mode says so and both have the same width (a basis has one width).
pub fn basis_groups(layout: &Layout, mode: BasisMode, widths: &[usize]) -> Vec<usize> {
    let mut groups = vec![0];
    let mut first_of_pair = true;
    for (i, segment) in layout.segments.iter().enumerate() {
        let shares = match mode {
            BasisMode::Point => false,
            BasisMode::Block => !segment.is_parallel() && first_of_pair,
            BasisMode::Global => true,
        };
        if !segment.is_parallel() {
            first_of_pair = !first_of_pair;
        }
        groups.push(if shares && widths[i] == widths[i + 1] { groups[i] } else { i + 1 });
    }
    groups
}
