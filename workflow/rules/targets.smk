# A results/ target no rule makes: a clear refusal while the DAG is built.

rule unknown_result:
    """A results/ file that no rule makes (a misspelt table, say): refused while the DAG is built,
    naming the closest valid targets, instead of Snakemake's generic MissingRuleException."""
    input:
        unknown_result_target,
    output:
        "results/{unknown}",
    wildcard_constraints:
        unknown="[^/]+",


ruleorder: table > unknown_result
ruleorder: claims > unknown_result
