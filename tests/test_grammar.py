"""Architecture grammar: seed <-> timm name <-> ArchSpec, round trips and error messages."""
import pytest

from timm_nlp.grammar import BACKBONES, ArchSpec, PoolSpec
from timm_nlp.models import GRID_POOLS, PAPER_EXAMPLES, grid_specs

GRID = [s for b in BACKBONES for dy in (False, True) for s in grid_specs(b, dy)]


def test_grid_size_and_names():
    assert len(GRID) == len(BACKBONES) * 2 * len(GRID_POOLS) * 3 == 468
    names = {s.timm_name for s in GRID}
    assert len(names) == len(GRID)
    assert {'resnet18_nlp_headfix2_1222', 'mobilenetv2_nlp_4222121', 'dyresnet18_lip_2222',
            'resnet50b1_nlp_headfix2_nowin_reduced_4222', 'dymobilenetv2_dfmixp_1222121',
            'mobilenetv2b0_skip_2222121'} <= names
    # no prefix names timm's pre-activation ResNetV2 or another network
    assert not any(n.startswith(('resnetv2', 'mobilenet_', 'efficientnet')) for n in names)


@pytest.mark.parametrize('spec', GRID, ids=lambda s: s.timm_name)
def test_grid_round_trip(spec):
    assert ArchSpec.from_timm_name(spec.timm_name) == spec
    assert ArchSpec.from_seed(spec.seed) == spec
    assert ArchSpec.from_seed(spec.seed).timm_name == spec.timm_name
    assert ArchSpec.from_timm_name(spec.timm_name).seed == spec.seed
    assert ArchSpec.parse(spec.seed.upper()) == spec and ArchSpec.parse(spec.timm_name.upper()) == spec


@pytest.mark.parametrize('seed', PAPER_EXAMPLES)
def test_paper_examples_convert(seed):
    spec = ArchSpec.from_seed(seed)
    assert ArchSpec.from_timm_name(spec.timm_name) == spec
    assert spec.seed == seed.lower()


def test_examples_parse_to_expected_specs():
    spec = ArchSpec.from_seed('PREPOOL-NLP_HEADFIX2-4-RESNET18-SKIP-1222')
    assert (spec.prepool, spec.prepool_stride, spec.backbone, spec.pool, spec.strides) == (
        PoolSpec('nlp', ('headfix2',)), 4, 'resnet18', PoolSpec('skip'), (1, 2, 2, 2))
    assert spec.timm_name == 'prepool_nlp_headfix2_4_resnet18_skip_1222'
    spec = ArchSpec.from_seed('dyresnet18-dfmnlp_reduced-1222')
    assert spec.dynamic and spec.pool == PoolSpec('dfmnlp', ('reduced',))
    assert spec.timm_name == 'dyresnet18_dfmnlp_reduced_1222'
    # the paper's two MobileNetV2 networks and its _v2 ResNets have prefixes of their own
    assert ArchSpec.from_seed('MOBILENET-SKIP-1222121').timm_name == 'mobilenetv2b0_skip_1222121'
    assert ArchSpec.from_seed('mobilenet_v2-skip-1222121').timm_name == 'mobilenetv2_skip_1222121'
    assert ArchSpec.from_seed('resnet18_v2-lip-4222').timm_name == 'resnet18b1_lip_4222'
    assert ArchSpec.from_timm_name('dyresnet50b1_nlp_1222').seed == 'dyresnet50_v2-nlp-1222'
    # modifiers in any order, canonical output
    assert ArchSpec.from_seed('resnet18-nlp_reduced_nowin_headfix2-1222').timm_name == \
        'resnet18_nlp_headfix2_nowin_reduced_1222'


def test_reductions_and_output_size():
    spec = ArchSpec.from_timm_name('resnet18_nlp_headfix2_4222')
    assert spec.reductions == (4, 16, 32, 64, 128)
    # pools floor, convs (skip, the stem) ceil; a map smaller than a window pools to one position
    assert spec.output_sizes(224) == (56, 14, 7, 3, 1) and spec.output_size(128) == 1
    assert spec.output_sizes(100, pool_ceil_mode=True) == (25, 7, 4, 2, 1)
    assert ArchSpec.from_seed('resnet18-skip-4222').output_sizes(100) == (25, 7, 4, 2, 1)
    assert ArchSpec.from_seed('resnet18-skip-1222').output_sizes(99) == (25, 25, 13, 7, 4)  # stem max-pool floors
    spec = ArchSpec.from_seed('prepool-lip-6-resnet18-skip-1222')
    assert spec.reductions == (6, 6, 12, 24, 48) and spec.output_sizes(224) == (37, 37, 19, 10, 5)
    assert ArchSpec.from_seed('prepool-skip-6-resnet18-skip-1222').output_sizes(224)[0] == 38
    assert ArchSpec.from_timm_name('mobilenetv2_nlp_2222121').reductions == (2, 4, 8, 16, 32, 32, 64, 64)
    assert ArchSpec.from_timm_name('mobilenetv2_nlp_2222121').output_sizes(99) == (50, 25, 12, 6, 3, 3, 1, 1)


@pytest.mark.parametrize('arch,pattern', [
    ('resnet19-nlp-1222', r"Unknown backbone 'resnet19'.*Valid backbones: resnet18, resnet50, resnet18_v2, "
                          r"resnet50_v2, mobilenet_v2, mobilenet"),
    ('resnet18-nlq-1222', r"Invalid pooling 'nlq'.*Valid methods: skip, maxp"),
    ('resnet18-nlp_headfix3-1222', r"Unknown pooling modifier 'headfix3'.*Valid modifiers: headfix2, nowin"),
    ('resnet18-nlp-122', r"Invalid stride digits '122'.*resnet18 takes 4 digits 1-9.*stock: 1222"),
    ('resnet18-nlp-1202', r"Invalid stride digits '1202'"),
    ('mobilenet_v2-nlp-1222', r"mobilenet_v2 takes 7 digits.*stock: 1222121"),
    ('resnet18-nlp', r"Malformed architecture string 'resnet18-nlp'.*BACKBONE-POOL-STRIDES"),
    ('prepool-nlp-4-resnet18-skip', r"expected prepool-POOL-S-BACKBONE-POOL-STRIDES \(6 tokens\), got 5"),
    ('prepool-nlp-x-resnet18-skip-1222', r"Invalid pre-pool stride 'x'"),
    ('prepool-foo-4-resnet18-skip-1222', r"Invalid pre-pool 'foo'.*Valid methods"),
    ('resnet18_nlp_12a2', r"Invalid stride digits '12a2'"),
    ('resnet99_nlp_1222', r"Unknown backbone 'resnet99' in model name 'resnet99_nlp_1222'.*Valid prefixes: resnet18"),
    ('resnetv2_34_nlp_headfix2_1222', r"Unknown backbone 'resnetv2_34' in model name"),
    ('prepol-nlp-4-resnet18-nlp-1222', r"a 6-token string starts with 'prepool'.*got 'prepol'"),
    ('resnet18_1222', r"Malformed model name 'resnet18_1222'"),
    ('prepool_nlp_resnet18_skip_1222', r"no pre-pool stride S after the pre-pool 'nlp'"),
    ('prepool_nlp_headfix2_dyresnet50_skip_1222', r"no pre-pool stride S after the pre-pool 'nlp_headfix2'"),
    ('resnet18_lip_nowin_1222', r"'lip' takes no modifiers"),
    ('resnet18-nlp-\u00b2222', r"Invalid stride digits '\u00b2222'"),  # a superscript 2: isdigit(), but not int()
    ('prepool-lip-\u00b2-resnet18-skip-1222', r"Invalid pre-pool stride '\u00b2'"),
    ('resnet18-nlp_-1222', r"Unknown pooling modifier ''"),
    ('resnet18_nlp__1222', r"Unknown pooling modifier ''"),
])
def test_malformed_strings(arch, pattern):
    with pytest.raises(ValueError, match=pattern):
        ArchSpec.parse(arch)


def test_spec_validation():
    with pytest.raises(ValueError, match='needs both prepool and prepool_stride'):
        ArchSpec('resnet18', 'nlp', '1222', prepool='lip')
    with pytest.raises(ValueError, match=r'takes 4 integers 1-9, one digit per stage'):
        ArchSpec('resnet18', 'nlp', (1, 2, 2))
    with pytest.raises(ValueError, match=r'takes 4 integers 1-9'):
        ArchSpec('resnet18', 'nlp', (1, 2, 2, 12))  # its seed would be resnet18-nlp-12212
    assert ArchSpec('mobilenet', 'skip', 1222121).backbone == 'mobilenet'
    with pytest.raises(ValueError, match="Unknown backbone 'resnetv2_18'"):
        ArchSpec('resnetv2_18', 'skip', 1222)
