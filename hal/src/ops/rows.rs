//! The row convention every op with per-row slots and positions follows (see [`super`]):
//! slots in range, positions ≥ 0, and the rows of one slot one contiguous run of consecutive
//! positions. Host-side backends check it with [`place_rows`]; device backends check the same
//! rules on the device and report the same messages.

use crate::error::{Error, Result};

/// Where one row sits under the slot/position convention of `hal::ops`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RowPlace {
    pub slot: usize,
    pub pos: usize,
    /// First row of this slot's run in the call, and that row's position.
    pub run_row: usize,
    pub run_pos: usize,
}

/// Checks the row convention (slot in range, position ≥ 0, each slot's rows one contiguous run
/// of consecutive positions) and returns each row's place. Errors name the op and the row.
pub fn place_rows(op: &str, slots: &[i32], positions: &[i32], num_slots: usize) -> Result<Vec<RowPlace>> {
    // Per slot: (last row seen, its position, run start row, run start position).
    let mut seen: Vec<Option<(usize, usize, usize, usize)>> = vec![None; num_slots];
    let mut places = Vec::with_capacity(slots.len());
    for (r, (&s, &p)) in slots.iter().zip(positions).enumerate() {
        let row_err = |m: String| Error::invalid(format!("{op} row {r}"), m);
        let slot = usize::try_from(s).ok().filter(|&s| s < num_slots);
        let slot = slot.ok_or_else(|| row_err(format!("slot {s} outside [0, {num_slots})")))?;
        let pos = usize::try_from(p).map_err(|_| row_err(format!("position {p} is negative")))?;
        let (run_row, run_pos) = match seen[slot] {
            None => (r, pos),
            Some((last_row, last_pos, run_row, run_pos)) => {
                if last_row + 1 != r {
                    return Err(row_err(format!(
                        "rows of slot {slot} are not contiguous (previous one is row {last_row})"
                    )));
                }
                if last_pos + 1 != pos {
                    return Err(row_err(format!(
                        "slot {slot}: position {pos} does not follow position {last_pos} of the previous row"
                    )));
                }
                (run_row, run_pos)
            }
        };
        seen[slot] = Some((r, pos, run_row, run_pos));
        places.push(RowPlace { slot, pos, run_row, run_pos });
    }
    Ok(places)
}
