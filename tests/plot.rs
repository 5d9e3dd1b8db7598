//! Loss pictures: `bessie::plot` and `bessie-plot` write a PNG of the expected size that decodes, with
//! the curves drawn; malformed metrics are errors naming the file and line.

use std::path::Path;
use std::process::Command;

use bessie::plot::{draw, read_metrics, SIZE};

const PLOT: &str = env!("CARGO_BIN_EXE_bessie-plot");

/// Width, height and RGB(A) pixels of a PNG file.
fn decode(path: &Path) -> (u32, u32, Vec<u8>, usize) {
    let decoder = png::Decoder::new(std::fs::File::open(path).unwrap());
    let mut reader = decoder.read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size()];
    let info = reader.next_frame(&mut buf).unwrap();
    buf.truncate(info.buffer_size());
    (info.width, info.height, buf, info.color_type.samples())
}

/// Pixels that are neither white nor grey: the coloured curves (the axes and grid are grey or black).
fn coloured_pixels(pixels: &[u8], samples: usize) -> usize {
    pixels.chunks(samples).filter(|p| p[0].abs_diff(p[1]) > 40 || p[1].abs_diff(p[2]) > 40).count()
}

fn metrics(dir: &Path, name: &str, lines: &[String]) -> std::path::PathBuf {
    let run = dir.join(name);
    std::fs::create_dir_all(&run).unwrap();
    let path = run.join("metrics.jsonl");
    std::fs::write(&path, lines.join("\n") + "\n").unwrap();
    path
}

fn falling(steps: usize, dev_every: usize) -> Vec<String> {
    let mut lines: Vec<String> = (1..=steps)
        .map(|s| {
            let loss = 6.0 / s as f64;
            match s % dev_every {
                0 => format!(r#"{{"step":{s},"loss":{loss},"dev_loss":{},"lr":0.001,"grad_norm":1.0}}"#, loss * 1.1),
                _ => format!(r#"{{"step":{s},"loss":{loss},"lr":0.001,"grad_norm":1.0}}"#),
            }
        })
        .collect();
    lines.insert(3, r#"{"step":3,"event":"resumed with changes","changes":["train.lr"]}"#.into());
    lines
}

#[test]
fn metrics_are_read_and_drawn() {
    let dir = tempfile::tempdir().unwrap();
    let path = metrics(dir.path(), "run-a", &falling(40, 10));
    let curves = read_metrics(&path).unwrap();
    assert_eq!(curves.name, "run-a");
    assert_eq!(curves.train.len(), 40, "the event line is no step");
    assert_eq!(curves.train[1], (2.0, 3.0));
    assert_eq!(curves.dev, [10, 20, 30, 40].map(|s| (s as f64, 6.0 / s as f64 * 1.1)));
    // A run directory stands for its metrics.jsonl.
    assert_eq!(read_metrics(path.parent().unwrap()).unwrap(), curves);

    let out = dir.path().join("loss.png");
    draw(&[curves], &out).unwrap();
    let (w, h, pixels, samples) = decode(&out);
    assert_eq!((w, h), SIZE);
    assert!(coloured_pixels(&pixels, samples) > 500, "no curve drawn");
    // Nothing else is left beside it.
    let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(names.len(), 2, "{names:?}");
}

#[test]
fn bad_metrics_lines_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let mut lines = falling(5, 10);
    lines[2] = r#"{"step":2,"loss":"#.into();
    let path = metrics(dir.path(), "broken", &lines);
    let e = format!("{:#}", read_metrics(&path).unwrap_err());
    assert!(e.contains(&format!("{}:3", path.display())), "{e}");
    let path = metrics(dir.path(), "no-loss", &[r#"{"step":1,"lr":0.1}"#.into()]);
    let e = format!("{:#}", read_metrics(&path).unwrap_err());
    assert!(e.contains(&format!("{}:1", path.display())) && e.contains("loss"), "{e}");
}

#[test]
fn bessie_plot_compares_runs_in_one_picture() {
    let dir = tempfile::tempdir().unwrap();
    let a = metrics(dir.path(), "a", &falling(30, 5));
    let b = metrics(dir.path(), "b", &falling(60, 20));
    let out = dir.path().join("both.png");
    let run = Command::new(PLOT).args([a.as_os_str(), b.as_os_str(), "-o".as_ref(), out.as_os_str()]).output().unwrap();
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    let (w, h, pixels, samples) = decode(&out);
    assert_eq!((w, h), SIZE);
    // Two runs draw more coloured pixels than one.
    let one = dir.path().join("one.png");
    draw(&[read_metrics(&a).unwrap()], &one).unwrap();
    let (_, _, single, _) = decode(&one);
    assert!(coloured_pixels(&pixels, samples) > coloured_pixels(&single, samples) + 300);

    std::fs::write(&b, "{\"step\":1,\"loss\":2.0}\nnot json\n").unwrap();
    let run = Command::new(PLOT).args([a.as_os_str(), b.as_os_str(), "-o".as_ref(), out.as_os_str()]).output().unwrap();
    let err = String::from_utf8_lossy(&run.stderr);
    assert!(!run.status.success() && err.contains(&format!("{}:2", b.display())), "{err}");
}
