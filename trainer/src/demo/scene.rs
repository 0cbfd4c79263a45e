//! Synthetic scenes for the demo: a few filled shapes (circle, square, triangle) in a few colors on
//! a plain background, drawn with the image crate, and questions whose answers the scene decides.
//!
//! Everything comes from one [`Rng`] stream, so a (seed, index) pair always gives the same scene,
//! question, answers and pixels.
use image::{Rgb, RgbImage};

use crate::rng::SplitMix64;

/// The demo's generator: SplitMix64 (`crate::rng`, the same on every platform: the demo's data is
/// part of its reproducibility, so no dependency whose stream could change), its state started at
/// the seed xor the golden-ratio constant.
#[derive(Debug, Clone)]
pub struct Rng(SplitMix64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(SplitMix64::new(seed ^ 0x9E37_79B9_7F4A_7C15))
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0.next_u64()
    }

    /// Uniform in `lo..=hi`.
    pub fn range(&mut self, lo: i64, hi: i64) -> i64 {
        lo + (self.next_u64() % ((hi - lo + 1) as u64)) as i64
    }

    /// True with probability `p`.
    pub fn chance(&mut self, p: f64) -> bool {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64 <= p
    }

    pub fn pick<'a, T>(&mut self, v: &'a [T]) -> &'a T {
        &v[self.range(0, v.len() as i64 - 1) as usize]
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Circle,
    Square,
    Triangle,
}

impl Kind {
    pub const ALL: [Kind; 3] = [Kind::Circle, Kind::Square, Kind::Triangle];
    pub fn name(self) -> &'static str {
        match self {
            Kind::Circle => "circle",
            Kind::Square => "square",
            Kind::Triangle => "triangle",
        }
    }
    pub fn plural(self) -> &'static str {
        match self {
            Kind::Circle => "circles",
            Kind::Square => "squares",
            Kind::Triangle => "triangles",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Color {
    Red,
    Green,
    Blue,
    Yellow,
}

impl Color {
    pub const ALL: [Color; 4] = [Color::Red, Color::Green, Color::Blue, Color::Yellow];
    pub fn name(self) -> &'static str {
        match self {
            Color::Red => "red",
            Color::Green => "green",
            Color::Blue => "blue",
            Color::Yellow => "yellow",
        }
    }
    pub fn rgb(self) -> Rgb<u8> {
        match self {
            Color::Red => Rgb([220, 40, 40]),
            Color::Green => Rgb([40, 170, 60]),
            Color::Blue => Rgb([40, 70, 220]),
            Color::Yellow => Rgb([235, 200, 30]),
        }
    }
}

/// One shape: center and "radius" (half the side for squares, circumradius-ish for triangles).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shape {
    pub kind: Kind,
    pub color: Color,
    pub x: i64,
    pub y: i64,
    pub r: i64,
}

impl Shape {
    pub fn name(&self) -> String {
        format!("{} {}", self.color.name(), self.kind.name())
    }
    /// Filled area in pixels (exactly the pixels [`Scene::render`] paints), which decides
    /// "the largest shape".
    pub fn area(&self) -> f64 {
        let mut n = 0usize;
        for py in self.y - self.r..=self.y + self.r {
            for px in self.x - self.r..=self.x + self.r {
                n += usize::from(self.contains(px, py));
            }
        }
        n as f64
    }
    fn contains(&self, px: i64, py: i64) -> bool {
        let (dx, dy) = (px - self.x, py - self.y);
        match self.kind {
            Kind::Circle => dx * dx + dy * dy <= self.r * self.r,
            Kind::Square => dx.abs() <= self.r && dy.abs() <= self.r,
            // apex at the top (y - r), base at y + r, half-width grows linearly to r
            Kind::Triangle => dy >= -self.r && dy <= self.r && 2 * dx.abs() <= dy + self.r,
        }
    }
}

/// A scene: background and shapes (at most [`MAX_SHAPES`], none overlapping).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scene {
    pub size: u32,
    pub background: Rgb<u8>,
    pub shapes: Vec<Shape>,
}

/// Few, large shapes: a from-scratch vision tower on an 8 x 8 patch grid learns what a shape's
/// pixel mass says (its color) within the demo's few hundred steps; five small shapes per scene
/// left it at the answer priors (BENCHMARKS.md, make demo).
pub const MAX_SHAPES: usize = 4;

/// The largest shape's area is at least this many times the runner-up's, so "the largest" is
/// obvious at a glance (and from the pixel counts of one 14-pixel patch grid).
pub const LARGEST_RATIO: f64 = 1.5;

impl Scene {
    /// 2..=4 shapes at random non-overlapping places: one large (radius size/5..size/4) and the
    /// others small (size/12..size/7), all with distinct sizes; the largest shape's color also
    /// covers the most pixels of any color (so its answer is the scene's dominant color).
    pub fn random(rng: &mut Rng, size: u32) -> Scene {
        loop {
            if let Some(scene) = Self::try_random(rng, size) {
                return scene;
            }
        }
    }

    fn try_random(rng: &mut Rng, size: u32) -> Option<Scene> {
        let s = size as i64;
        let n = rng.range(2, MAX_SHAPES as i64) as usize;
        let shade = rng.range(235, 250) as u8;
        let background = Rgb([shade, shade, rng.range(230, 250) as u8]);
        let big = ((s / 5).max(6), (s / 4).max(7));
        let small = ((s / 12).max(4), (s / 7).max(5));
        let mut shapes: Vec<Shape> = vec![];
        // areas[i] = shapes[i].area() (a pixel count: computed once per shape, not per try)
        let mut areas: Vec<f64> = vec![];
        let mut tries = 0;
        while shapes.len() < n && tries < 2000 {
            tries += 1;
            let (rmin, rmax) = if shapes.is_empty() { big } else { small };
            let r = rng.range(rmin, rmax);
            let sh = Shape {
                kind: *rng.pick(&Kind::ALL),
                color: *rng.pick(&Color::ALL),
                x: rng.range(r + 2, s - r - 3),
                y: rng.range(r + 2, s - r - 3),
                r,
            };
            let a = sh.area();
            let clear = shapes.iter().zip(&areas).all(|(o, &oa)| {
                let (dx, dy) = (o.x - sh.x, o.y - sh.y);
                // apart even corner to corner (a square's corner is r * sqrt(2) out), distinct
                // sizes (so "largest" is clear) and distinct x (so left/right is clear)
                let gap = (o.r + sh.r) as f64 * 1.42 + 3.0;
                (dx * dx + dy * dy) as f64 >= gap * gap
                    && (oa - a).abs() > 0.15 * oa.max(a)
                    && (o.x - sh.x).abs() >= 6
            });
            // the first (large) shape stays the largest by LARGEST_RATIO
            let small_enough = areas.first().is_none_or(|&b| b >= LARGEST_RATIO * a);
            if clear && small_enough {
                shapes.push(sh);
                areas.push(a);
            }
        }
        if shapes.len() < 2 {
            return None;
        }
        let scene = Scene {
            size,
            background,
            shapes,
        };
        // shapes[0] is the largest (LARGEST_RATIO above)
        let top = scene.shapes[0].color;
        let area_of = |c: Color| -> f64 {
            let mine = scene
                .shapes
                .iter()
                .zip(&areas)
                .filter(|(s, _)| s.color == c);
            mine.map(|(_, a)| a).sum()
        };
        let dominant = Color::ALL
            .iter()
            .all(|&c| c == top || area_of(c) < area_of(top));
        dominant.then_some(scene)
    }

    pub fn render(&self) -> RgbImage {
        let mut img = RgbImage::from_pixel(self.size, self.size, self.background);
        for sh in &self.shapes {
            let c = sh.color.rgb();
            for py in (sh.y - sh.r).max(0)..=(sh.y + sh.r).min(self.size as i64 - 1) {
                for px in (sh.x - sh.r).max(0)..=(sh.x + sh.r).min(self.size as i64 - 1) {
                    if sh.contains(px, py) {
                        img.put_pixel(px as u32, py as u32, c);
                    }
                }
            }
        }
        img
    }

    pub fn count_color(&self, c: Color) -> usize {
        self.shapes.iter().filter(|s| s.color == c).count()
    }
    pub fn count_kind(&self, k: Kind) -> usize {
        self.shapes.iter().filter(|s| s.kind == k).count()
    }
    pub fn largest(&self) -> &Shape {
        self.shapes
            .iter()
            .max_by(|a, b| a.area().total_cmp(&b.area()))
            .expect("a scene has shapes")
    }
    /// Shapes from left to right.
    pub fn left_to_right(&self) -> Vec<Shape> {
        let mut v = self.shapes.clone();
        v.sort_by_key(|s| s.x);
        v
    }
    /// Shapes from the largest to the smallest.
    pub fn by_size(&self) -> Vec<Shape> {
        let mut v = self.shapes.clone();
        v.sort_by(|a, b| b.area().total_cmp(&a.area()));
        v
    }
    /// "red circle, blue square, green triangle." (largest first: every record's caption starts
    /// by naming the largest shape, so every training record teaches that one visual fact, which
    /// a from-scratch model learns in the demo's budget; short: the model is tiny).
    pub fn caption(&self) -> String {
        let names: Vec<String> = self.by_size().iter().map(|s| s.name()).collect();
        format!("{}.", names.join(", "))
    }
}

/// The question types (the bench's `category`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Category {
    CountColor,
    CountShape,
    LargestColor,
    LeftRight,
    Compare,
}

impl Category {
    pub const ALL: [Category; 5] = [
        Category::CountColor,
        Category::CountShape,
        Category::LargestColor,
        Category::LeftRight,
        Category::Compare,
    ];
    pub fn name(self) -> &'static str {
        match self {
            Category::CountColor => "count_color",
            Category::CountShape => "count_shape",
            Category::LargestColor => "largest_color",
            Category::LeftRight => "left_right",
            Category::Compare => "compare",
        }
    }
}

/// A question about a scene with its right answer, a plausible wrong answer, and the staged texts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Qa {
    pub category: Category,
    pub question: String,
    pub answer: String,
    pub choices: Vec<String>,
    /// Turn 1's answer (the right one, or a plausible mistake).
    pub first: String,
    /// Turn 2's refined answer (always right; confirms `first` when it was right).
    pub refined: String,
    pub first_correct: bool,
}

/// (question, right answer, plausible wrong answer, choices, reasoning for an answer, summary,
/// evidence: what in the image decides the answer, restated by the correction turn).
type QaParts = (
    String,
    String,
    String,
    Vec<String>,
    Box<dyn Fn(&str) -> String>,
    &'static str,
    String,
);

/// "red circle, blue square" (left to right), or "none" for no shapes.
fn list(shapes: &[Shape]) -> String {
    if shapes.is_empty() {
        return "none".into();
    }
    let names: Vec<String> = shapes.iter().map(|s| s.name()).collect();
    names.join(", ")
}

/// Minimum horizontal distance (pixels) between the two shapes of a left/right question: more
/// than a 14-pixel patch, so the answer never hinges on a few pixels inside one patch.
pub const MIN_DX: i64 = 20;

fn counts() -> Vec<String> {
    (0..=MAX_SHAPES).map(|n| n.to_string()).collect()
}

fn staged(summary: &str, caption: &str, reasoning: &str, conclusion: &str) -> String {
    format!(
        "<SUMMARY>{summary}</SUMMARY><CAPTION>{caption}</CAPTION><REASONING>{reasoning}</REASONING><CONCLUSION>{conclusion}</CONCLUSION>"
    )
}

/// Picks a question for `scene` (category by `rng`) and writes both turns; with probability
/// `p_wrong` the first turn is wrong in a plausible way (a miscount, a swapped color or side).
pub fn make_qa(scene: &Scene, rng: &mut Rng, p_wrong: f64) -> Qa {
    let category = *rng.pick(&Category::ALL);
    let wrong = rng.chance(p_wrong);
    let caption = scene.caption();
    let (question, answer, mistaken, choices, reason, summary, evidence): QaParts = match category {
        Category::CountColor => {
            let c = balanced_pick(rng, &Color::ALL, |c| scene.count_color(c));
            let n = scene.count_color(c);
            let off = if n == 0 || rng.chance(0.5) {
                n + 1
            } else {
                n - 1
            };
            let name = c.name();
            (
                format!("How many {name} shapes are there?"),
                n.to_string(),
                off.to_string(),
                counts(),
                Box::new(move |a| format!("{a} {name}.")),
                "Count a color.",
                format!("{name} shapes: {}.", list(&filter(scene, |s| s.color == c))),
            )
        }
        Category::CountShape => {
            let k = balanced_pick(rng, &Kind::ALL, |k| scene.count_kind(k));
            let n = scene.count_kind(k);
            let off = if n == 0 || rng.chance(0.5) {
                n + 1
            } else {
                n - 1
            };
            let plural = k.plural();
            (
                format!("How many {plural} are there?"),
                n.to_string(),
                off.to_string(),
                counts(),
                Box::new(move |a| format!("{a} {plural}.")),
                "Count a shape.",
                format!("{plural}: {}.", list(&filter(scene, |s| s.kind == k))),
            )
        }
        Category::LargestColor => {
            let big = *scene.largest();
            let others: Vec<Color> = Color::ALL
                .iter()
                .copied()
                .filter(|&c| c != big.color)
                .collect();
            let swapped = *rng.pick(&others);
            let kind = big.kind.name();
            (
                "What color is the largest shape?".to_string(),
                big.color.name().to_string(),
                swapped.name().to_string(),
                Color::ALL.iter().map(|c| c.name().to_string()).collect(),
                Box::new(move |a| format!("Largest is {a} {kind}.")),
                "Find the largest.",
                format!("{} is bigger than {}.", big.name(), runner_up(scene).name()),
            )
        }
        Category::LeftRight => {
            let shapes = scene.left_to_right();
            // two shapes whose names are unique in the scene, so the question is unambiguous
            let unique: Vec<Shape> = shapes
                .iter()
                .copied()
                .filter(|s| shapes.iter().filter(|o| o.name() == s.name()).count() == 1)
                .collect();
            let pairs: Vec<(Shape, Shape)> = unique
                .iter()
                .flat_map(|&a| unique.iter().map(move |&b| (a, b)))
                .filter(|(a, b)| (a.x - b.x).abs() >= MIN_DX)
                .collect();
            let (a, b) = if !pairs.is_empty() {
                *rng.pick(&pairs)
            } else {
                // every name repeats: ask about the leftmost vs rightmost with different names,
                // else fall back to counting
                return make_qa_fallback(scene, rng, p_wrong);
            };
            let side = if a.x < b.x { "left" } else { "right" };
            let other = if side == "left" { "right" } else { "left" };
            let (an, bn) = (a.name(), b.name());
            (
                format!("Is the {an} left or right of the {bn}?"),
                side.to_string(),
                other.to_string(),
                vec!["left".to_string(), "right".to_string()],
                Box::new(move |s| format!("{an} is {s}.")),
                "Compare positions.",
                {
                    let (l, r) = if a.x < b.x { (a, b) } else { (b, a) };
                    format!("{} is left of {}.", l.name(), r.name())
                },
            )
        }
        Category::Compare => {
            let mut pair: Vec<Color> = Color::ALL.to_vec();
            // two colors with different counts; none when every color appears equally often (4
            // shapes, one of each): then another kind of question
            let mut found = None;
            for _ in 0..16 {
                let a = *rng.pick(&pair);
                let b = *rng.pick(&pair);
                if a != b && scene.count_color(a) != scene.count_color(b) {
                    found = Some((a, b));
                    break;
                }
            }
            let (a, b) = match found {
                Some(p) => p,
                None => {
                    pair.sort_by_key(|&c| std::cmp::Reverse(scene.count_color(c)));
                    if scene.count_color(pair[0]) == scene.count_color(pair[3]) {
                        return make_qa_fallback(scene, rng, p_wrong);
                    }
                    (pair[0], pair[3])
                }
            };
            let (win, lose) = if scene.count_color(a) > scene.count_color(b) {
                (a, b)
            } else {
                (b, a)
            };
            let (an, bn) = (a.name(), b.name());
            (
                format!("Are there more {an} or {bn} shapes?"),
                win.name().to_string(),
                lose.name().to_string(),
                vec![an.to_string(), bn.to_string()],
                Box::new(move |w| {
                    let other = if w == an { bn } else { an };
                    format!("More {w} than {other}.")
                }),
                "Compare counts.",
                format!(
                    "{} {an}, {} {bn}.",
                    scene.count_color(a),
                    scene.count_color(b)
                ),
            )
        }
    };
    let first_ans = if wrong { &mistaken } else { &answer };
    let first = staged(summary, &caption, &reason(first_ans), first_ans);
    // the correction restates what the image shows, then decides: the evidence is the same
    // whether turn 1 was right or wrong, so only comparing it with turn 1 tells which
    let refined_reason = if wrong {
        format!("Recheck: {evidence} {} Not {mistaken}.", reason(&answer))
    } else {
        format!("Recheck: {evidence} {} Confirmed.", reason(&answer))
    };
    let refined = staged(summary, &caption, &refined_reason, &answer);
    Qa {
        category,
        question,
        answer,
        choices,
        first,
        refined,
        first_correct: !wrong,
    }
}

/// Picks what a counting question asks about so that the answers 0, 1 and 2 come up about as
/// often as the scenes allow (a uniformly picked color is absent from most scenes, which makes
/// "0" an answer a model scores with by ignoring the image): a wanted count first, then an item
/// with it.
fn balanced_pick<T: Copy>(rng: &mut Rng, items: &[T], count: impl Fn(T) -> usize) -> T {
    let start = rng.range(0, 2) as usize;
    // the wanted count, else the next one that the scene has (2 is rarer than 0 and 1)
    for k in 0..3 {
        let want = (start + k) % 3;
        let with: Vec<T> = items
            .iter()
            .copied()
            .filter(|&t| count(t) == want)
            .collect();
        if !with.is_empty() {
            return *rng.pick(&with);
        }
    }
    *rng.pick(items)
}

/// The scene's shapes that satisfy `keep`, left to right.
fn filter(scene: &Scene, keep: impl Fn(&Shape) -> bool) -> Vec<Shape> {
    scene
        .left_to_right()
        .into_iter()
        .filter(|s| keep(s))
        .collect()
}

/// The second largest shape (scenes have at least 2 shapes).
fn runner_up(scene: &Scene) -> Shape {
    let mut v = scene.shapes.clone();
    v.sort_by(|a, b| b.area().total_cmp(&a.area()));
    v[1.min(v.len() - 1)]
}

fn make_qa_fallback(scene: &Scene, rng: &mut Rng, p_wrong: f64) -> Qa {
    loop {
        let qa = make_qa(scene, rng, p_wrong);
        if qa.category != Category::LeftRight {
            return qa;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compare_questions_always_have_an_answer() {
        let mut rng = Rng::new(7);
        let mut compares = 0;
        for _ in 0..3000 {
            let scene = Scene::random(&mut rng, 64);
            let qa = make_qa(&scene, &mut rng, 0.3);
            if qa.category != Category::Compare {
                continue;
            }
            compares += 1;
            let count = |name: &str| {
                let c = Color::ALL.iter().find(|c| c.name() == name).expect("color");
                scene.count_color(*c)
            };
            let w: Vec<&str> = qa.question.split_whitespace().collect();
            let (a, b) = (w[3], w[5]); // "Are there more A or B shapes?"
            assert_ne!(count(a), count(b), "{}", qa.question);
            assert_eq!(qa.answer, if count(a) > count(b) { a } else { b });
        }
        assert!(compares > 300, "{compares}");
    }
}
