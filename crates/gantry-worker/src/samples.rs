//! Sample grids: a fixed latent batch rendered as one PNG, comparable across steps.

use std::io::BufWriter;
use std::path::Path;

use anyhow::{Context, Result, bail};

/// Pixels between tiles and around the grid.
const GAP: usize = 2;
/// Each image pixel becomes SCALE × SCALE output pixels, so 28×28 digits stay legible.
const SCALE: usize = 2;

/// Lays `images` (NCHW u8, C = 1 or 3) out as a `cols`-wide grid and encodes it as PNG.
pub fn grid_png(images: &[u8], shape: [usize; 3], cols: usize) -> Result<Vec<u8>> {
    let [c, h, w] = shape;
    let per_image = c * h * w;
    if per_image == 0 || !images.len().is_multiple_of(per_image) || !(c == 1 || c == 3) || cols == 0
    {
        bail!(
            "cannot lay out {} bytes as images of shape {shape:?}",
            images.len()
        );
    }
    let n = images.len() / per_image;
    let rows = n.div_ceil(cols);
    let width = cols * (w + GAP) + GAP;
    let height = rows * (h + GAP) + GAP;
    let mut canvas = vec![0u8; width * height * c];
    for (i, image) in images.chunks_exact(per_image).enumerate() {
        let (top, left) = (GAP + (i / cols) * (h + GAP), GAP + (i % cols) * (w + GAP));
        for y in 0..h {
            for x in 0..w {
                for ch in 0..c {
                    canvas[((top + y) * width + left + x) * c + ch] = image[ch * h * w + y * w + x];
                }
            }
        }
    }
    let (width, height, canvas) = upscale(&canvas, width, height, c);

    let mut png_bytes = Vec::new();
    {
        let mut encoder =
            png::Encoder::new(BufWriter::new(&mut png_bytes), width as u32, height as u32);
        encoder.set_color(if c == 1 {
            png::ColorType::Grayscale
        } else {
            png::ColorType::Rgb
        });
        encoder.set_depth(png::BitDepth::Eight);
        let mut writer = encoder.write_header().context("PNG header")?;
        writer.write_image_data(&canvas).context("PNG data")?;
    }
    Ok(png_bytes)
}

fn upscale(canvas: &[u8], width: usize, height: usize, c: usize) -> (usize, usize, Vec<u8>) {
    let (big_w, big_h) = (width * SCALE, height * SCALE);
    let mut out = vec![0u8; big_w * big_h * c];
    for y in 0..big_h {
        for x in 0..big_w {
            let src = ((y / SCALE) * width + x / SCALE) * c;
            out[(y * big_w + x) * c..][..c].copy_from_slice(&canvas[src..src + c]);
        }
    }
    (big_w, big_h, out)
}

/// Writes the grid for `step` as `dir/step-NNNNNNNN.png` (atomically) and returns its path.
pub fn write_grid(
    dir: &Path,
    step: u64,
    images: &[u8],
    shape: [usize; 3],
) -> Result<std::path::PathBuf> {
    write_named_grid(dir, &format!("step-{step:08}.png"), images, shape)
}

/// Writes an 8-wide grid of `images` as `dir/name` (atomically) and returns its path.
pub fn write_named_grid(
    dir: &Path,
    name: &str,
    images: &[u8],
    shape: [usize; 3],
) -> Result<std::path::PathBuf> {
    let png = grid_png(images, shape, 8)?;
    let path = dir.join(name);
    gantry_store::atomic::write(&path, &png)
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grid_round_trips_through_a_png_decoder() {
        let shape = [1, 4, 3];
        let images: Vec<u8> = (0..5 * 12).map(|i| (i * 4) as u8).collect();
        let png_bytes = grid_png(&images, shape, 2).unwrap();
        let decoder = png::Decoder::new(std::io::Cursor::new(png_bytes));
        let mut reader = decoder.read_info().unwrap();
        let mut buf = vec![0; reader.output_buffer_size().unwrap()];
        let info = reader.next_frame(&mut buf).unwrap();
        // 2 columns, 3 rows of 3×4 tiles with 2-pixel gaps, doubled.
        assert_eq!(
            (info.width, info.height),
            (((2 * 5) + 2) * 2, ((3 * 6) + 2) * 2)
        );
        // Image 1 (second tile in the first row), pixel (y=1, x=2): value (12 + 1*3 + 2) * 4.
        let (x, y) = ((2 + 5 + 2) * 2, (2 + 1) * 2);
        assert_eq!(buf[y * info.width as usize + x], ((12 + 3 + 2) * 4) as u8);
        // Gaps stay black.
        assert_eq!(buf[0], 0);
    }

    #[test]
    fn rejects_ragged_input() {
        assert!(grid_png(&[0; 10], [1, 2, 2], 8).is_err());
        assert!(grid_png(&[0; 8], [2, 2, 2], 8).is_err());
    }
}
