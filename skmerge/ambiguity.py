"""Indexing ambiguity: one consistent setting for every image.

When the lattice has more symmetry than the space group (P6₃, P4₃, R3, P3₁21, …), an
image can be indexed in any of several settings related by the lattice's twin laws, and
serial stills usually are, at random. Merged as they come, such images mix the
intensities of two (or more) structures. This module finds, for every image, the
operator that brings it into one common setting.

The operators are those of :func:`gemmi.find_twin_laws` (coset representatives of the
Laue group in the lattice's holohedry, identity first), or given by the user.
:func:`assign_operators` chooses an operator per image before the fit by the consistency
of the images' normalised intensities with each other (for two settings the leading
singular vector of the images' "difference" vectors, the spectral solution of the
pairwise problem, then coordinate ascent; for more, coordinate ascent from several
starts); the estimator then refines the choice with the fitted model's likelihood
(:class:`skmerge.VariationalMerger`, ``reindexing``), which also gives each image's
posterior probability of every operator.
"""

import warnings

import gemmi
import numpy as np
import reciprocalspaceship as rs

from .errors import DataWarning, InputError, ParameterError
from .symmetry import map_to_asu, pack_hkl, reflection_flags

REINDEX_COLUMN = "reindex_op"
"""The column of a reindexed table that holds each row's operator (an index into the
merger's ``reindexing_operators_``); a table that has it is already consistent."""

# Miller indices in general position (no symmetry of any lattice maps one onto itself or
# its Friedel mate) that tell operators apart modulo the Laue group.
_PROBES = np.array([[2, 5, 11], [7, 3, 13], [1, 9, 4]], dtype=np.int64)
_N_SHELLS = 20
_MAX_ROUNDS = 50
_N_STARTS = 8
_MAX_SPOT_SPAN = 15
# Twin-related reflections that correlate this well relative to repeated measurements
# make the settings indistinguishable (a perfect twin or a higher symmetry gives 1).
_SYMMETRIC_RATIO = 0.7


class Operators:
    """Reindexing operators of a space group, identity first, with their products
    modulo the Laue group.

    Parameters
    ----------
    operators : list of gemmi.Op
        Operators on Miller indices (h' = h·R); the first must be the identity.
    spacegroup : gemmi.SpaceGroup

    Attributes
    ----------
    names : list of str
        The operators as h,k,l triplets.
    product : ndarray of shape (n, n)
        ``product[a, b]``: the operator equal to applying ``a``, then ``b``.
    inverse : ndarray of shape (n,)
    """

    def __init__(self, operators, spacegroup):
        self.spacegroup = spacegroup
        self.operators = list(operators)
        self.names = [op.as_hkl().triplet() for op in operators]
        signatures = [self._signature(op) for op in operators]
        if len(set(signatures)) != len(signatures):
            raise ParameterError(f"reindexing operators {', '.join(self.names)}: two of them are equivalent under "
                                 f"the symmetry of {spacegroup.xhm()}; give each setting once.")
        index = {s: i for i, s in enumerate(signatures)}
        n = len(self.operators)
        self.product = np.array([[index.get(self._signature(operators[a].combine(operators[b])), -1)
                                  for b in range(n)] for a in range(n)])
        if (self.product < 0).any():
            raise ParameterError(f"reindexing operators {', '.join(self.names)} do not form a group with the "
                                 f"symmetry of {spacegroup.xhm()}; give every twin law of the lattice "
                                 "(gemmi.find_twin_laws lists them), or 'auto'.")
        self.inverse = np.argmax(self.product == 0, axis=1)

    def __len__(self):
        return len(self.operators)

    def _signature(self, op):
        # Probes scaled by the denominator stay integral under centred-lattice operators.
        asu, _ = map_to_asu(transform_hkl(_PROBES * op.DEN, op), self.spacegroup, anomalous=False)
        return tuple(asu.ravel())

    def apply(self, hkl, operator):
        """``hkl`` reindexed row by row by ``operator`` (an index per row)."""
        hkl = np.asarray(hkl, dtype=np.int64)
        out = np.empty_like(hkl)
        for k, op in enumerate(self.operators):
            rows = operator == k
            out[rows] = transform_hkl(hkl[rows], op)
        return out.astype(np.int32)


def transform_hkl(hkl, op):
    """Miller indices transformed by a gemmi.Op, h' = h·R (as ``Op.apply_to_hkl``),
    vectorised; InputError when an index does not map onto an integral one (an operator
    of another lattice)."""
    scaled = np.asarray(hkl, dtype=np.int64) @ np.array(op.rot, dtype=np.int64)
    if (scaled % op.DEN).any():
        raise InputError(f"operator {op.as_hkl().triplet()} maps Miller indices to fractional ones; it is not an "
                         "operator of this lattice.")
    return scaled // op.DEN


def candidate_operators(reindexing, spacegroup, cell):
    """The settings an image may be indexed in: an :class:`Operators`, or None when
    there is nothing to resolve.

    Parameters
    ----------
    reindexing : "auto", "none" or list of str
        "auto": the twin laws of the lattice (:func:`gemmi.find_twin_laws`, obliquity up
        to 3°); "none": none; a list: these operators (h,k,l or x,y,z triplets; the
        identity is added).
    spacegroup : gemmi.SpaceGroup
    cell : gemmi.UnitCell

    Examples
    --------
    >>> import gemmi
    >>> ops = candidate_operators("auto", gemmi.SpaceGroup("P 63"), gemmi.UnitCell(50, 50, 80, 90, 90, 120))
    >>> ops.names
    ['h,k,l', '-h-k,k,-l']
    """
    if isinstance(reindexing, str):
        if reindexing == "none":
            return None
        twin_laws = gemmi.find_twin_laws(cell, spacegroup, 3.0, False)
        if not twin_laws:
            return None
        return Operators([gemmi.Op("x,y,z"), *twin_laws], spacegroup)
    operators = [gemmi.Op("x,y,z")]
    for text in reindexing:
        try:
            op = parse_operator(text)
        except (RuntimeError, ValueError) as exc:
            raise ParameterError(f"reindexing operator {text!r} is not an operator such as 'k,h,-l' ({exc}).") \
                from None
        if op.tran != [0, 0, 0] or abs(round(op.det_rot() / op.DEN**3)) != 1:
            raise ParameterError(f"reindexing operator {text!r} must be a rotation without translation, such as "
                                 "'k,h,-l'.")
        _check_preserves_lattice(op, text, cell)
        if op.as_hkl().triplet() == "h,k,l":
            continue
        operators.append(op)
    return Operators(operators, spacegroup)


def parse_operator(text):
    """A gemmi.Op from an h,k,l or x,y,z triplet, in x,y,z form (the form
    :func:`transform_hkl` and products use; ``as_hkl().triplet()`` gives the h,k,l one)."""
    op = gemmi.Op(str(text))
    return op.as_xyz() if op.is_hkl() else op


def _check_preserves_lattice(op, text, cell):
    probes = _PROBES.astype(float)
    moved = probes @ (np.array(op.rot, dtype=float) / op.DEN)
    before, after = cell.calculate_d_array(probes), cell.calculate_d_array(moved)
    if not np.allclose(before, after, rtol=1e-3):
        raise ParameterError(f"reindexing operator {text!r} does not map the lattice of cell "
                             f"{tuple(round(v, 2) for v in cell.parameters)} onto itself; it cannot relate two "
                             "indexings of the same crystal.")


def reindex(X, operators, image_operator, image_ids, anomalous):
    """The observation table with every image in the common setting.

    The observed indices Hobs, Kobs, Lobs of each image are reindexed by its operator
    and the ASU indices, centric flags and ε recomputed from them; column
    :data:`REINDEX_COLUMN` records the operator of every row. A table that already has
    that column is returned as it is.

    Parameters
    ----------
    X : rs.DataSet
        Observation table (:func:`skmerge.read_unmerged`).
    operators : Operators
    image_operator : ndarray of int
        The operator of each of ``image_ids``.
    image_ids : ndarray
        Sorted image_id values; images of X not among them keep their indexing.
    anomalous : bool
        The Friedel convention of X's H, K, L.
    """
    if REINDEX_COLUMN in X.columns:
        return X
    image = X["image_id"].to_numpy(np.int64)
    row = np.minimum(np.searchsorted(image_ids, image), len(image_ids) - 1)
    known = image_ids[row] == image
    operator = np.where(known, np.asarray(image_operator)[row], 0)
    X = X.copy()
    X[REINDEX_COLUMN] = rs.DataSeries(operator, dtype="MTZInt", index=X.index)
    if not operator.any():
        return X
    observed = operators.apply(X[["Hobs", "Kobs", "Lobs"]].to_numpy(np.int64), operator)
    asu, _ = map_to_asu(observed, X.spacegroup, anomalous)
    centric, epsilon = reflection_flags(asu, X.spacegroup)
    for i, (obs_key, key) in enumerate(zip(("Hobs", "Kobs", "Lobs"), ("H", "K", "L"))):
        X[obs_key] = rs.DataSeries(observed[:, i], dtype="HKL", index=X.index)
        X[key] = rs.DataSeries(asu[:, i], dtype="HKL", index=X.index)
    if "asu_index" in X.columns:
        X["asu_index"] = rs.DataSeries(np.unique(pack_hkl(asu), return_inverse=True)[1].ravel(), dtype="MTZInt",
                                       index=X.index)
    if "CENTRIC" in X.columns:
        X["CENTRIC"] = centric
    if "EPSILON" in X.columns:
        X["EPSILON"] = rs.DataSeries(epsilon, dtype="MTZInt", index=X.index)
    return X


def assign_operators(X, operators, reference=None, random_state=None):
    """Choose the operator of every image that makes the images agree best.

    The observations' intensities are normalised by the mean of their resolution shell
    and standardised within their image; the agreement of two images is the sum of the
    products of their normalised intensities on the reflections they share. With two
    settings the assignment maximising the total agreement is approached by the leading
    singular vector of the images' difference vectors (each image's intensities in one
    setting minus those in the other), then refined by coordinate ascent; with more, by
    coordinate ascent from several starts. Of the equivalent global settings, the one
    that agrees best with ``reference`` is chosen, or else that of most images.

    Parameters
    ----------
    X : rs.DataSet
        Observation table.
    operators : Operators
    reference : rs.DataSet or path, optional
        Merged data (F or I) whose setting the result takes.
    random_state : int, RandomState instance or None

    Returns
    -------
    image_ids : ndarray
        The sorted image_id values of X.
    image_operator : ndarray of int
        The operator of each image (an index into ``operators``).
    """
    from sklearn.utils import check_random_state

    rng = check_random_state(random_state)
    image_ids, image = np.unique(X["image_id"].to_numpy(np.int64), return_inverse=True)
    image = image.ravel()
    n_images = len(image_ids)
    if n_images == 1 or len(operators) == 1:
        return image_ids, np.zeros(n_images, dtype=np.int64)
    keys = _setting_keys(X, operators)
    x = _normalised_intensities(X, image, n_images)
    neighbours = _neighbours(X, image, n_images)
    if len(operators) == 2:
        starts = [_spectral_start(image, keys, x, n_images, rng)]
    else:
        starts = [np.zeros(n_images, np.int64)] + [rng.randint(len(operators), size=n_images)
                                                     for _ in range(_N_STARTS - 1)]
    best, best_value = None, -np.inf
    for start in starts:
        assignment, value = _coordinate_ascent(start, image, keys, x, n_images, operators, neighbours)
        if value > best_value:
            best, best_value = assignment, value
    symmetric = _symmetric_settings(best, image, keys, x, operators, neighbours.shape[1])
    if symmetric:
        warnings.warn(
            f"{X.spacegroup.xhm()}: the intensities are nearly symmetric under "
            + ", ".join(f"{operators.names[k]} (CC {twin:.2f} between related reflections, {half:.2f} between "
                        "halves of the images)" for k, (twin, half) in symmetric.items())
            + "; the settings cannot be told apart, so the images are merged as indexed. The crystal may have "
            "higher symmetry than its space group, or be twinned.", DataWarning, stacklevel=2)
        return image_ids, np.zeros(n_images, dtype=np.int64)
    return image_ids, _global_setting(best, X, operators, image, reference)


def _symmetric_settings(assignment, image, keys, x, operators, block):
    """The operators under which the data, in the setting of ``assignment``, look the
    same: twin-related reflections correlate nearly as well as the same reflection
    measured in two halves of the images (ratio above :data:`_SYMMETRIC_RATIO`). The
    halves alternate in blocks of ``block`` images, so that the partials of a spot stay
    in one half. Returns {operator: (CC of related reflections, CC of halves)}."""
    n_keys = int(keys.max()) + 1
    rows = np.arange(len(x))
    current = keys[assignment[image], rows]
    half = (image // block) % 2 == 0
    means = []
    for part in (half, ~half):
        count = np.bincount(current[part], minlength=n_keys)
        means.append(np.where(count > 0, np.bincount(current[part], x[part], n_keys) / np.maximum(count, 1), np.nan))
    first, second = means
    cc_half = _nan_correlation(first, second)
    symmetric = {}
    for k in range(1, len(operators)):
        # The reflection each reflection becomes under operator k, from the observations.
        related = np.full(n_keys, -1)
        related[current] = keys[operators.product[assignment[image], k], rows]
        found = related >= 0
        cc_twin = _nan_correlation(first[found], second[related[found]])
        if cc_twin > _SYMMETRIC_RATIO * cc_half:
            symmetric[k] = (cc_twin, cc_half)
    return symmetric


def _nan_correlation(a, b):
    both = np.isfinite(a) & np.isfinite(b)
    if both.sum() < 3:
        return np.nan
    return float(np.corrcoef(a[both], b[both])[0, 1])


def _setting_keys(X, operators):
    """Per operator, the reflection (Friedel mates together) of every observation
    reindexed by it, as indices into one list of reflections."""
    hkl = X[["Hobs", "Kobs", "Lobs"]].to_numpy(np.int64)
    packed = []
    for k in range(len(operators)):
        asu, _ = map_to_asu(operators.apply(hkl, np.full(len(hkl), k)), X.spacegroup, anomalous=False)
        packed.append(pack_hkl(asu))
    _, keys = np.unique(np.concatenate(packed), return_inverse=True)
    return keys.reshape(len(operators), len(hkl))


def _normalised_intensities(X, image, n_images):
    """I over the mean I of its resolution shell, clipped against outliers, then
    centred and scaled within its image (so that agreement measures correlation)."""
    intensity = X["Iobs"].to_numpy(np.float64)
    d = X["dHKL"].to_numpy(np.float64)
    edges = np.quantile(1 / d**2, np.linspace(0, 1, _N_SHELLS + 1)[1:-1])
    shell = np.searchsorted(edges, 1 / d**2)
    mean = np.bincount(shell, intensity, _N_SHELLS) / np.maximum(np.bincount(shell, minlength=_N_SHELLS), 1)
    e2 = np.clip(intensity / np.where(mean[shell] > 0, mean[shell], 1.0), -3.0, 20.0)
    count = np.maximum(np.bincount(image, minlength=n_images), 1)
    centred = e2 - (np.bincount(image, e2, n_images) / count)[image]
    sd = np.sqrt(np.bincount(image, centred**2, n_images) / count)
    return centred / np.where(sd > 0, sd, 1.0)[image]


def _spectral_start(image, keys, x, n_images, rng):
    """Two settings: the signs of the leading eigenvector of the images' agreement in
    equal minus that in opposite settings. With u_i the difference of image i's
    intensities in setting 0 and in setting 1 (a sparse vector over reflections), that
    matrix is U·Uᵀ without its diagonal (an image's agreement with itself)."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.linalg import LinearOperator, eigsh

    n_keys = int(keys.max()) + 1
    rows = np.concatenate([image, image])
    matrix = coo_matrix((np.concatenate([x, -x]), (rows, np.concatenate([keys[0], keys[1]]))),
                        shape=(n_images, n_keys)).tocsr()
    self_agreement = np.asarray(matrix.multiply(matrix).sum(axis=1)).ravel()
    agreement = LinearOperator((n_images, n_images), dtype=np.float64,
                               matvec=lambda s: matrix @ (matrix.T @ s) - self_agreement * s.ravel())
    if n_images < 3:
        dense = agreement @ np.eye(n_images)
        vector = np.linalg.eigh(dense)[1][:, -1]
    else:
        vector = eigsh(agreement, k=1, which="LA", v0=rng.standard_normal(n_images))[1][:, 0]
    return (vector < 0).astype(np.int64)


def _correlations(assignment, image, keys, x, n_images, n_operators, neighbours):
    """Correlation of every image's intensities, in every setting, with the mean of the
    other images' intensities per reflection in their current settings: shape
    (n_images, n_operators); NaN where an image shares fewer than 3 reflections.

    ``neighbours`` (n_images, m) lists, per image, the images left out of its reference
    along with itself (−1 pads): in rotation data a spot spreads over adjacent images
    whose partial intensities are anti-correlated, which would favour every setting but
    the image's own."""
    n_keys = int(keys.max()) + 1
    current = keys[assignment[image], np.arange(len(x))]
    total = np.bincount(current, x, n_keys)
    count = np.bincount(current, minlength=n_keys).astype(np.float64)
    image_code, image_row = np.unique(image * n_keys + current, return_inverse=True)
    image_total = np.bincount(image_row.ravel(), x)
    image_count = np.bincount(image_row.ravel()).astype(np.float64)
    correlation = np.full((n_images, n_operators), np.nan)
    for k in range(n_operators):
        left_total, left_count = np.zeros(len(x)), np.zeros(len(x))
        for column in neighbours.T:
            other = column[image]
            code = np.where(other >= 0, other, 0) * n_keys + keys[k]
            at = np.minimum(np.searchsorted(image_code, code), len(image_code) - 1)
            hit = (image_code[at] == code) & (other >= 0)
            left_total += np.where(hit, image_total[at], 0.0)
            left_count += np.where(hit, image_count[at], 0.0)
        others = count[keys[k]] - left_count
        shared = (others > 0).astype(np.float64)
        reference = shared * (total[keys[k]] - left_total) / np.maximum(others, 1)
        n, a, b, aa, bb, ab = (np.bincount(image, w, n_images) for w in (
            shared, shared * x, reference, shared * x**2, reference**2, x * reference))
        with np.errstate(invalid="ignore", divide="ignore"):
            cov = ab - a * b / n
            var = (aa - a**2 / n) * (bb - b**2 / n)
            correlation[:, k] = np.where((n >= 3) & (var > 0), cov / np.sqrt(var), np.nan)
    return correlation


def _neighbours(X, image, n_images):
    """For every image, itself and the images of its file within the span of a spot
    (−1 pads): the longest run of consecutive images on which one observed Miller index
    recurs in at least 1 % of the runs (rotation data: a few; stills: none)."""
    file_of_image = np.zeros(n_images, np.int64)
    if "file_id" in X.columns:
        file_of_image[image] = X["file_id"].to_numpy(np.int64)
    hkl = X[["Hobs", "Kobs", "Lobs"]].to_numpy(np.int64)
    spot = np.unique(np.column_stack([file_of_image[image], hkl]), axis=0, return_inverse=True)[1].ravel()
    order = np.lexsort((image, spot))
    spot, img = spot[order], image[order]
    new_run = np.r_[True, (spot[1:] != spot[:-1]) | (img[1:] - img[:-1] > 1)]
    run = np.cumsum(new_run) - 1
    first = np.flatnonzero(new_run)
    length = np.bincount(run, minlength=len(first))
    span = np.maximum.reduceat(img, first) - np.minimum.reduceat(img, first) + 1 if len(first) else length
    width = int(min(np.quantile(span, 0.99), _MAX_SPOT_SPAN)) - 1 if len(span) else 0
    offsets = np.arange(-width, width + 1)
    neighbour = np.arange(n_images)[:, None] + offsets[None, :]
    inside = (neighbour >= 0) & (neighbour < n_images)
    neighbour = np.where(inside, neighbour, 0)
    same_file = inside & (file_of_image[neighbour] == file_of_image[:, None])
    return np.where(same_file, neighbour, -1)


def _coordinate_ascent(assignment, image, keys, x, n_images, operators, neighbours):
    """Move every image to the setting in which its intensities correlate best with the
    other images' (:func:`_correlations`) until no image moves; returns the assignment
    and its total correlation."""
    seen = set()
    value = -np.inf
    for _ in range(_MAX_ROUNDS):
        correlation = np.nan_to_num(_correlations(assignment, image, keys, x, n_images, len(operators), neighbours),
                                    nan=-1.0)
        value = float(correlation[np.arange(n_images), assignment].sum())
        state = assignment.tobytes()
        if state in seen:
            break
        seen.add(state)
        better = np.argmax(correlation, axis=1)
        moved = correlation[np.arange(n_images), better] > correlation[np.arange(n_images), assignment]
        if not moved.any():
            break
        assignment = np.where(moved, better, assignment)
    return assignment, value


def _global_setting(assignment, X, operators, image, reference):
    """The assignment composed with the global operator that agrees best with the
    reference, or that leaves most images in their own setting."""
    if reference is None:
        counts = np.bincount(assignment, minlength=len(operators))
        # Ties keep the identity (the order of the operators).
        majority = int(np.argmax(counts))
        return operators.product[assignment, operators.inverse[majority]]
    from types import SimpleNamespace

    from .model.priors import _reference_amplitudes

    # Read once; each global operator is then scored against it.
    ref_hkl, ref_f, _ = _reference_amplitudes(reference, SimpleNamespace(spacegroup=X.spacegroup, anomalous=False))
    ref_keys, ref_i = pack_hkl(ref_hkl), ref_f**2
    hkl = X[["Hobs", "Kobs", "Lobs"]].to_numpy(np.int64)
    intensity = X["Iobs"].to_numpy(np.float64)
    scores = [_reference_agreement(operators.apply(hkl, operators.product[assignment, g][image]), intensity,
                                   X.spacegroup, ref_keys, ref_i) for g in range(len(operators))]
    return operators.product[assignment, int(np.nanargmax(scores))]


def _reference_agreement(hkl, intensity, spacegroup, ref_keys, ref_i):
    """Correlation of the mean intensity per reflection of the reindexed ``hkl`` with
    the reference's intensities."""
    asu, _ = map_to_asu(hkl, spacegroup, anomalous=False)
    keys, where = np.unique(pack_hkl(asu), return_inverse=True)
    where = where.ravel()
    mean = np.bincount(where, intensity) / np.bincount(where)
    at = np.minimum(np.searchsorted(ref_keys, keys), len(ref_keys) - 1)
    shared = ref_keys[at] == keys
    if shared.sum() < 3:
        raise InputError("the reindexing reference shares fewer than 3 reflections with the data; give a merged "
                         "data set of the same crystal form.")
    return float(np.corrcoef(mean[shared], ref_i[at[shared]])[0, 1])


def setting_probabilities(state, params, model, X, operators, seed, n_samples=8):
    """Posterior probability of every setting of every image of X under a fitted model.

    Each image's observations are scored in every setting — X's own (the operator 0)
    and X reindexed by each other operator — by their log predictive density under the
    model (:meth:`FitState.log_predictive <skmerge.model.fitted.FitState.log_predictive>`);
    with equal prior probabilities, the probability of a setting is the softmax of the
    images' summed log densities.

    Returns
    -------
    image_ids : ndarray
        The sorted image_id values of X.
    probabilities : ndarray of shape (n_images, n_operators)
        Column k: the probability that the image belongs in X's setting transformed by
        operator k.
    """
    image_ids, image = np.unique(X["image_id"].to_numpy(np.int64), return_inverse=True)
    image = image.ravel()
    base = X.drop(columns=[REINDEX_COLUMN]) if REINDEX_COLUMN in X.columns else X
    log_likelihood = np.empty((len(image_ids), len(operators)))
    for k in range(len(operators)):
        moved = reindex(base, operators, np.full(len(image_ids), k), image_ids, params.anomalous)
        values = state.log_predictive(params, model, moved, None, n_samples, seed)
        log_likelihood[:, k] = np.bincount(image, values, len(image_ids))
    log_likelihood -= log_likelihood.max(axis=1, keepdims=True)
    probabilities = np.exp(log_likelihood)
    return image_ids, probabilities / probabilities.sum(axis=1, keepdims=True)
