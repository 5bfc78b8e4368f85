#!/usr/bin/env bash
# Does the import graph between the top-level modules of src/ have a cycle?
#
#   scripts/check-module-cycles.sh           report cycles; exit 1 if any
#   scripts/check-module-cycles.sh --edges   also print every edge
#
# A module is a file src/x.rs or a directory src/x/ (all its files count as
# x). An edge x -> y is any `crate::y…` path in x's code: `use` lines
# (grouped ones too, `use crate::{a, b::c}`) and inline paths
# (`crate::auth::cache::unix_now()`). Comments are ignored, so a doc link
# to another module is not a dependency. lib.rs and main.rs are the root and
# not part of the graph. Each cycle is reported as one strongly connected
# component: one loop through it, then every edge inside it with the lines
# that make it (removing edges until none is left in a loop breaks it).
set -euo pipefail
cd "$(dirname "$0")/.."

show_edges=0
[ "${1:-}" = "--edges" ] && show_edges=1

find src -name '*.rs' ! -path src/lib.rs ! -path src/main.rs -print0 | sort -z |
  SHOW_EDGES=$show_edges perl -0 -e '
use strict;
use warnings;

my (%edges, %why);
for my $file (split /\0/, do { local $/; <STDIN> }) {
    next unless length $file;
    my ($from) = $file =~ m{^src/([a-z0-9_]+)};
    open my $fh, "<", $file or die "$file: $!";
    my @lines = do { local $/ = "\n"; <$fh> };
    close $fh;
    my $code = "";
    my @line_of;    # offset in $code -> line number
    for my $i (0 .. $#lines) {
        my $l = $lines[$i];
        $l =~ s{//.*$}{};          # comments (no `//` inside the paths we look for)
        $l =~ s{"(?:[^"\\]|\\.)*"}{""}g;    # string literals
        push @line_of, [length $code, $i + 1];
        $code .= $l;
    }
    my $line_at = sub {
        my $pos = shift;
        my $n = 1;
        for (@line_of) { last if $_->[0] > $pos; $n = $_->[1]; }
        return $n;
    };
    while ($code =~ m{\bcrate::(\{|[a-z0-9_]+)}g) {
        my $pos = $-[0];
        my @targets;
        if ($1 eq "{") {
            # The group up to its matching brace; its top-level items.
            my ($depth, $i, $group) = (1, pos($code), "");
            while ($depth > 0 && $i < length $code) {
                my $c = substr($code, $i++, 1);
                $depth++ if $c eq "{";
                $depth-- if $c eq "}";
                $group .= $c if $depth > 0;
            }
            my ($d, $item) = (0, "");
            for my $c (split //, $group . ",") {
                if ($c eq "," && $d == 0) {
                    push @targets, $1 if $item =~ /^\s*([a-z0-9_]+)/;
                    $item = "";
                    next;
                }
                $d++ if $c eq "{";
                $d-- if $c eq "}";
                $item .= $c;
            }
        } else {
            @targets = ($1);
        }
        for my $to (@targets) {
            next if $to eq $from || $to eq "self";
            $edges{$from}{$to} = 1;
            push @{ $why{"$from $to"} }, "$file:" . $line_at->($pos);
        }
    }
}

if ($ENV{SHOW_EDGES}) {
    for my $f (sort keys %edges) {
        print "$f -> $_\n" for sort keys %{ $edges{$f} };
    }
    print "\n";
}

# Tarjan: strongly connected components.
my (%index, %low, %on, @stack, @sccs);
my $next = 0;
my $visit;
$visit = sub {
    my $v = shift;
    $index{$v} = $low{$v} = $next++;
    push @stack, $v;
    $on{$v} = 1;
    for my $w (sort keys %{ $edges{$v} // {} }) {
        if (!exists $index{$w}) {
            $visit->($w);
            $low{$v} = $low{$w} if $low{$w} < $low{$v};
        } elsif ($on{$w}) {
            $low{$v} = $index{$w} if $index{$w} < $low{$v};
        }
    }
    if ($low{$v} == $index{$v}) {
        my @c;
        while (1) {
            my $w = pop @stack;
            $on{$w} = 0;
            push @c, $w;
            last if $w eq $v;
        }
        push @sccs, [sort @c] if @c > 1;
    }
};
$visit->($_) for grep { !exists $index{$_} } sort keys %edges;

if (!@sccs) {
    print "no import cycle between the top-level modules of src/\n";
    exit 0;
}
for my $c (@sccs) {
    my %in = map { $_ => 1 } @$c;
    # One loop through the component: breadth-first from its first module
    # back to itself.
    my $start = $c->[0];
    my %prev;
    my @queue = ($start);
    my $found;
    BFS: while (@queue) {
        my $v = shift @queue;
        for my $w (sort keys %{ $edges{$v} }) {
            next unless $in{$w};
            if ($w eq $start) { $prev{"\0end"} = $v; $found = 1; last BFS; }
            next if exists $prev{$w};
            $prev{$w} = $v;
            push @queue, $w;
        }
    }
    my @loop = ($start);
    my $v = $prev{"\0end"};
    while ($v ne $start) { unshift @loop, $v; $v = $prev{$v}; }
    unshift @loop, $start;
    print "cycle among {", join(", ", @$c), "}, e.g. ", join(" -> ", @loop), "; its edges:\n";
    for my $f (@$c) {
        for my $t (sort grep { $in{$_} } keys %{ $edges{$f} }) {
            my @at = @{ $why{"$f $t"} };
            my $more = @at > 3 ? " (+" . (@at - 3) . " more)" : "";
            print "    $f -> $t: ", join(", ", @at[0 .. ($#at < 2 ? $#at : 2)]), "$more\n";
        }
    }
}
exit 1;
'
